"""Documents as people have them (text of any name, PDF, HTML, DOCX, EPUB, folders) read to
text with their structure kept: headings as markdown, `[page N]` and `[file PATH]` markers
that sections report and answers cite. No torch here."""
from .base import FILE_MARK, PAGE_MARK, Document, DocumentError, write_atomic
from .limits import MAX_DOCUMENT_BYTES
from .read import FORMATS, document_from_bytes, read_document, read_stdin
from .sniff import decode_text

__all__ = ["FILE_MARK", "FORMATS", "MAX_DOCUMENT_BYTES", "PAGE_MARK", "Document", "DocumentError", "decode_text",
           "document_from_bytes", "read_document", "read_stdin", "write_atomic"]
