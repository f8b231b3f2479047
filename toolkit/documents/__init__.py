"""Documents as people have them (text of any name, PDF, HTML, DOCX, EPUB, folders) read to
text with their structure kept: headings as markdown, `[page N]` and `[file PATH]` markers
that sections report and answers cite. No torch here."""
from .base import FILE_MARK, PAGE_MARK, Document, DocumentError, write_atomic
from .read import FORMATS, document_from_bytes, read_document
from .sniff import decode_text

__all__ = ["FILE_MARK", "FORMATS", "PAGE_MARK", "Document", "DocumentError", "decode_text",
           "document_from_bytes", "read_document", "write_atomic"]
