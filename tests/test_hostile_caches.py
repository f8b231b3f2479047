"""Saved caches trusted no further than they can be checked, and folders the toolkit did not
write never deleted or replaced: a damaged tensor byte, a header that lies about a dtype, a
manifest naming files outside the cache or missing a key, are refused in one line; a folder
with someone else's manifest.json given to --cache / --save-cache / --cache-dir is refused
and left byte for byte as it was; a cache the toolkit wrote is still replaced. World 1 in this
process (a tiny random model), and one 2-rank check of the shared hashing."""
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import xxhash
from click.testing import CliRunner

import session_bodies
from helpers import DOC, QUESTIONS, one_error_line
from toolkit import LongContextModel
from toolkit.cli import cli
from toolkit.sessions import CacheError
from toolkit.sessions.ownership import MARKER
from toolkit.sessions.store import check_target
from toolkit.sessions.verify import MODEL, RANK, TOP
from toolkit.summarize.section_cache import SectionCache

NEW = 4


@pytest.fixture(scope="module")
def model_dir(tiny_dirs):
    return tiny_dirs("llama4l")


@pytest.fixture(scope="module")
def lcm(model_dir):
    return LongContextModel.from_pretrained(model_dir, chunk_size=16)


@pytest.fixture(scope="module")
def session(lcm):
    return lcm.prefill_document(DOC)


@pytest.fixture(scope="module")
def original(session, tmp_path_factory):
    path = tmp_path_factory.mktemp("saved") / "doc.kv"
    session.save(path)
    return path


@pytest.fixture
def cache(original, tmp_path) -> Path:
    return Path(shutil.copytree(original, tmp_path / "doc.kv"))


def refusal(lcm, path, words: str) -> str:
    with pytest.raises(CacheError) as caught:
        lcm.load_document(path)
    message = str(caught.value)
    assert words in message and "\n" not in message, message
    return message


def snapshot(folder: Path) -> dict:
    """Every entry under folder (not following links): kind, mode and bytes or link target."""
    out = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root, name)
            st = p.lstat()
            body = os.readlink(p) if p.is_symlink() else p.read_bytes() if p.is_file() else None
            out[str(p.relative_to(folder))] = (st.st_mode, body)
    return out


def manifest_of(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def write_manifest(path: Path, manifest: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(manifest))


def header(file: Path) -> tuple[int, dict]:
    data = file.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return n, json.loads(data[8 : 8 + n])


def rewrite_header(file: Path, edit) -> None:
    """Change a safetensors header in place, padded with spaces to its old length (offsets unchanged)."""
    data = file.read_bytes()
    n, head = header(file)
    edit(head)
    new = json.dumps(head, separators=(",", ":")).encode()
    assert len(new) <= n
    file.write_bytes(data[:8] + new + b" " * (n - len(new)) + data[8 + n :])


def test_a_saved_cache_loads_and_answers_as_the_session_did(lcm, session, cache):
    manifest = manifest_of(cache)
    rank = manifest["ranks"][0]
    assert set(manifest) == set(TOP) and set(rank) == set(RANK) | {"xxh3_128"}  # every key written is one checked
    data = (cache / rank["file"]).read_bytes()
    assert rank["xxh3_128"] == xxhash.xxh3_128_hexdigest(data) and rank["bytes"] == len(data)
    assert json.loads((cache / MARKER).read_text()) == {"format": "lctk-document-cache", "id": manifest["marker"]}
    assert rank["tensors"]["k.0"] == {"dtype": "F32", "shape": [1, 2, len(DOC), 16]}
    loaded = lcm.load_document(cache)
    assert loaded.ask(QUESTIONS[0], NEW).token_ids == session.ask(QUESTIONS[0], NEW).token_ids


@pytest.mark.parametrize("name, kv_dtype", [("llama4l", "int8"), ("llama4l", "int4"), ("llama4l", "fp8"),
                                            ("llama4l", "bf16"), ("gemma3", "auto")])
def test_every_stored_kind_passes_its_own_checks(tiny_dirs, tmp_path, name, kv_dtype):
    """Quantised planes and their scales, a cast cache, a windowed one (its layers keep their last
    keys only): what the manifest lists is exactly what the model writes, and it loads."""
    model = LongContextModel.from_pretrained(tiny_dirs(name), chunk_size=16, kv_dtype=kv_dtype)
    prefilled = model.prefill_document(DOC)
    manifest = prefilled.save(tmp_path / "kv")
    assert manifest["kv_dtype"] == kv_dtype and (name != "gemma3" or manifest["evicted"])
    loaded = model.load_document(tmp_path / "kv")
    assert loaded.ask(QUESTIONS[1], NEW).token_ids == prefilled.ask(QUESTIONS[1], NEW).token_ids


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_one_flipped_tensor_byte_is_refused(lcm, cache, where):
    file = cache / "rank-00000.safetensors"
    data = bytearray(file.read_bytes())
    start = 8 + header(file)[0]
    at = {"first": start, "middle": (start + len(data)) // 2, "last": len(data) - 1}[where]
    data[at] ^= 0x01
    file.write_bytes(bytes(data))
    refusal(lcm, cache, "rank-00000.safetensors is damaged")


def test_a_format_3_cache_is_still_read_and_checked_by_its_sha256(lcm, session, cache):
    """Format 3 recorded sha256 per rank file (4: xxh3-128): such a cache loads, and a damaged byte
    in it is refused by its own checksum."""
    manifest = manifest_of(cache)
    file = cache / manifest["ranks"][0]["file"]
    manifest["format_version"] = 3
    manifest["ranks"][0]["sha256"] = hashlib.sha256(file.read_bytes()).hexdigest()
    del manifest["ranks"][0]["xxh3_128"]
    write_manifest(cache, manifest)
    loaded = lcm.load_document(cache)
    assert loaded.ask(QUESTIONS[0], NEW).token_ids == session.ask(QUESTIONS[0], NEW).token_ids
    data = bytearray(file.read_bytes())
    data[-1] ^= 0x01
    file.write_bytes(bytes(data))
    refusal(lcm, cache, "its sha256 is not the one the manifest recorded")


def test_a_header_claiming_another_dtype_is_refused(lcm, cache):
    rewrite_header(cache / "rank-00000.safetensors", lambda h: h["k.1"].update(dtype="I32"))  # 4 bytes as F32
    refusal(lcm, cache, "the file says tensor 'k.1' is I32")


def test_a_header_and_manifest_agreeing_on_a_wrong_dtype_are_refused(lcm, cache):
    rewrite_header(cache / "rank-00000.safetensors", lambda h: h["v.0"].update(dtype="I32"))
    manifest = manifest_of(cache)
    manifest["ranks"][0]["tensors"]["v.0"]["dtype"] = "I32"
    write_manifest(cache, manifest)
    refusal(lcm, cache, "the manifest says tensor 'v.0' is I32")


def test_a_header_with_another_shape_is_refused(lcm, cache):
    rewrite_header(cache / "rank-00000.safetensors", lambda h: h["k.2"].update(shape=[1, 1, 2 * len(DOC), 16]))
    refusal(lcm, cache, "the file says tensor 'k.2' is F32 [1, 1, 90, 16]")


@pytest.mark.parametrize("name", ["../outside.safetensors", "ABSOLUTE", "sub/rank-00000.safetensors", "..", ""])
def test_manifest_file_names_outside_the_cache_are_refused(lcm, cache, tmp_path, name):
    outside = tmp_path / "outside.safetensors"  # the very bytes: only the name is wrong
    shutil.copy(cache / "rank-00000.safetensors", outside)
    manifest = manifest_of(cache)
    manifest["ranks"][0]["file"] = str(outside) if name == "ABSOLUTE" else name
    write_manifest(cache, manifest)
    refusal(lcm, cache, "is not a plain file name inside the cache folder")


@pytest.mark.parametrize("name", ["rank-00000.safetensors", "tokens.safetensors", "manifest.json"])
def test_a_symlink_in_the_cache_pointing_out_is_refused(lcm, cache, tmp_path, name):
    outside = tmp_path / f"outside-{name}"
    shutil.move(cache / name, outside)  # the same bytes, out of the folder
    (cache / name).symlink_to(outside)
    refusal(lcm, cache, "symbolic link")


def _drop(manifest: dict, path: str) -> None:
    parts = path.split(".")
    obj = manifest
    for part in parts[:-1]:
        obj = obj[int(part)] if isinstance(obj, list) else obj[part]
    del obj[parts[-1]]


MISSING = ([k for k in TOP] + [f"model.{k}" for k in MODEL] + [f"ranks.0.{k}" for k in RANK])


@pytest.mark.parametrize("key", MISSING)
def test_a_manifest_missing_any_key_is_refused_in_one_line(lcm, cache, key):
    manifest = manifest_of(cache)
    _drop(manifest, key)
    write_manifest(cache, manifest)
    words = {"format": "is not an lctk document cache manifest", "format_version": "written in cache format None"}
    refusal(lcm, cache, words.get(key, f"{key.rsplit('.', 1)[-1]!r} is missing"))


@pytest.mark.parametrize("edit, words", [
    (lambda m: m.update(tokens="45"), "'tokens' should be an integer, not str"),
    (lambda m: m.update(chat=1), "'chat' should be true or false"),
    (lambda m: m.update(ranks={}), "'ranks' should be a list"),
    (lambda m: m.update(ranks=[]), "'ranks' is empty"),
    (lambda m: m["ranks"].append(m["ranks"][0]), "two ranks name the same file"),
    (lambda m: m["ranks"][0].update(positions=[[0, 10 ** 9]]), "inside the 45 tokens"),
    (lambda m: m["ranks"][0].update(positions=[[10, 5], [0, 5]]), "ascending"),
    (lambda m: m["ranks"][0].update(layers=[0, 99]), "'layers' should be a list of integers from 0 below 4"),
    (lambda m: m["ranks"][0].update(kv_heads=[0, 7]), "KV heads up to 7; this model has 2"),
    (lambda m: m["ranks"][0].update(xxh3_128="x" * 32), "'xxh3_128' is not a size and a xxh3_128 hex digest"),
    (lambda m: m["ranks"][0].pop("xxh3_128"), "ranks[0]: 'xxh3_128' is missing"),
    (lambda m: m["ranks"][0]["tensors"].pop("k.3"), "holds a tensor 'k.3' the manifest does not list"),
    (lambda m: m["model"].update(layers=True), "'layers' should be an integer"),
])
def test_a_manifest_with_a_wrong_value_is_refused_in_one_line(lcm, cache, edit, words):
    manifest = manifest_of(cache)
    edit(manifest)
    write_manifest(cache, manifest)
    refusal(lcm, cache, words)


@pytest.mark.parametrize("data, words", [
    (b'{"format": "lctk-document-cache", "format_version": 3, "to', "manifest.json is corrupted"),
    (b"[1, 2, 3]", "is not an lctk document cache manifest"),
    (b"\xff\xfe{}", "manifest.json is corrupted"),
    (b"", "manifest.json is corrupted"),
])
def test_a_damaged_manifest_is_refused_in_one_line(lcm, cache, data, words):
    (cache / "manifest.json").write_bytes(data)
    refusal(lcm, cache, words)


def test_a_cache_of_an_older_format_is_refused_to_load_and_to_replace(lcm, session, cache):
    manifest = manifest_of(cache)
    manifest["format_version"] = 2
    del manifest["marker"]
    write_manifest(cache, manifest)
    (cache / MARKER).unlink()
    before = snapshot(cache)
    refusal(lcm, cache, "written in cache format 2")
    with pytest.raises(CacheError, match="is not a saved document cache lctk can replace"):
        session.save(cache)
    assert snapshot(cache) == before


def foreign_folder(parent: Path) -> Path:
    """A web app's folder: its own manifest.json, pages, a sub-folder, a link."""
    app = parent / "webapp"
    (app / "static").mkdir(parents=True)
    (app / "manifest.json").write_text(json.dumps({"name": "Shop", "icons": [], "start_url": "/"}))
    (app / "index.html").write_text("<h1>shop</h1>")
    (app / "static" / "app.js").write_text("console.log(1)")
    (app / "link").symlink_to("index.html")
    return app


def test_a_foreign_folder_is_refused_by_save_and_left_untouched(session, tmp_path):
    app = foreign_folder(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(CacheError, match="is not a saved document cache lctk can replace: it has no lctk-marker"):
        session.save(app)
    assert snapshot(tmp_path) == before  # nothing beside it either: no partial or old folder left


@pytest.mark.parametrize("change, words", [
    ("extra-file", "holds files lctk did not write there (notes.txt)"),
    ("other-id", "does not record the id of its lctk-marker.json"),
    ("marker-only", "does not record the id"),
    ("symlink", "is a symbolic link"),
    ("a-file", "exists and is not a directory"),
])
def test_a_folder_lctk_cannot_prove_it_wrote_is_never_replaced(session, cache, tmp_path, change, words):
    target = cache
    if change == "extra-file":
        (cache / "notes.txt").write_text("mine")
    elif change == "other-id":
        (cache / MARKER).write_text(json.dumps({"format": "lctk-document-cache", "id": "0" * 32}))
    elif change == "marker-only":
        target = foreign_folder(tmp_path / "app")
        shutil.copy(cache / MARKER, target / MARKER)
    elif change == "symlink":
        target = tmp_path / "link.kv"
        target.symlink_to(cache)
    elif change == "a-file":
        target = tmp_path / "file.kv"
        target.write_text("not a folder")
    before = snapshot(tmp_path)
    with pytest.raises(CacheError) as caught:
        session.save(target)
    assert words in str(caught.value) and "\n" not in str(caught.value), caught.value
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("command", [
    ["ask", "{doc}", "-q", "x", "--cache", "{app}"],
    ["ask", "{doc}", "-q", "x", "--save-cache", "{app}"],
    ["summarize", "{doc}", "--save-cache", "{app}"],
    ["summarize", "{doc}", "--cache-dir", "{app}"],
])
def test_the_cli_refuses_a_foreign_folder_before_any_work_and_leaves_it(model_dir, tmp_path, command):
    app = foreign_folder(tmp_path)
    (tmp_path / "doc.txt").write_text("A short document.")
    before = snapshot(tmp_path)
    args = [a.format(doc=tmp_path / "doc.txt", app=app) for a in command]
    result = CliRunner().invoke(cli, [*args, "--model", model_dir])
    line = one_error_line(result)
    assert str(app) in line and ("not a saved document cache" in line or "not a section cache" in line), line
    assert "lctk: read" not in result.stderr  # refused before the document was read or a model loaded
    assert snapshot(tmp_path) == before


def test_a_cache_the_toolkit_wrote_is_replaced_and_nothing_is_left_beside_it(lcm, session, cache):
    first = manifest_of(cache)["marker"]
    data = bytearray((cache / "rank-00000.safetensors").read_bytes())
    data[-1] ^= 0x01  # damaged, but ours: replaced, as --cache does after a refused load
    (cache / "rank-00000.safetensors").write_bytes(bytes(data))
    assert check_target(cache) == cache.absolute()  # the CLI's check before any work lets it through
    refusal(lcm, cache, "is damaged")
    manifest = session.save(cache)
    assert manifest["marker"] != first and json.loads((cache / MARKER).read_text())["id"] == manifest["marker"]
    assert sorted(p.name for p in cache.parent.iterdir()) == ["doc.kv"]  # no .partial or .old folder
    assert lcm.load_document(cache).ask(QUESTIONS[0], NEW).token_ids == session.ask(QUESTIONS[0], NEW).token_ids


def test_an_empty_or_new_folder_takes_a_cache(lcm, session, tmp_path):
    (tmp_path / "empty").mkdir()
    for target in (tmp_path / "empty", tmp_path / "new"):
        session.save(target)
        assert lcm.load_document(target).tokens == len(DOC)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "new"]


def test_the_cli_accepts_its_own_cache_and_goes_on(model_dir, original, tmp_path):
    (tmp_path / "doc.txt").write_text("A short document.")
    result = CliRunner().invoke(cli, ["ask", str(tmp_path / "doc.txt"), "-q", "x", "--cache", str(original),
                                      "--model", model_dir])
    assert "needs a tokenizer" in one_error_line(result)  # past the folder check: the tiny model has no tokenizer


def section_cache(folder, resume=True) -> SectionCache:
    return SectionCache(folder, resume, "model", {"max_new": 8})


def test_the_section_cache_refuses_a_foreign_folder_and_leaves_it(tmp_path):
    app = foreign_folder(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="is not a section cache lctk wrote"):
        section_cache(app)
    assert snapshot(tmp_path) == before


def test_the_section_cache_marks_its_folder_and_keeps_older_section_files(tmp_path):
    old = tmp_path / "sections"
    old.mkdir()
    (old / f"{'a' * 32}.json").write_text(json.dumps({"summary": "from before markers"}))
    cache = section_cache(old)  # a folder of section files only: an older lctk's, taken on
    key = cache.key([1, 2, 3])
    assert cache.lookup(key) is None
    cache.store(key, "done")
    assert json.loads((old / MARKER).read_text())["format"] == "lctk-section-cache"
    assert section_cache(old).lookup(key) == "done"
    assert json.loads((old / f"{'a' * 32}.json").read_text()) == {"summary": "from before markers"}


@pytest.mark.parametrize("damage", ["not-json", "no-summary", "symlink-out"])
def test_a_damaged_or_linked_section_file_is_a_miss(tmp_path, damage):
    cache = section_cache(tmp_path / "sections")
    key = cache.key([4, 5])
    cache.store(key, "real")
    file = tmp_path / "sections" / f"{key}.json"
    if damage == "not-json":
        file.write_text("{")
    elif damage == "no-summary":
        file.write_text(json.dumps({"other": 1}))
    else:
        secret = tmp_path / "secret.json"
        secret.write_text(json.dumps({"summary": "someone else's text"}))
        file.unlink()
        file.symlink_to(secret)
    assert section_cache(tmp_path / "sections").lookup(key) is None
    if damage == "symlink-out":
        section_cache(tmp_path / "sections").store(key, "again")  # replaces the link, not what it points to
        assert json.loads((tmp_path / "secret.json").read_text()) == {"summary": "someone else's text"}


def test_the_checksum_is_streamed_in_blocks(tmp_path, monkeypatch):
    from toolkit.sessions import verify

    data = os.urandom(10_000)
    (tmp_path / "f").write_bytes(data)
    monkeypatch.setattr(verify, "BLOCK", 4096)  # three reads of a reused buffer
    assert verify.file_checksum(tmp_path / "f", "xxh3_128") == xxhash.xxh3_128_hexdigest(data)
    assert verify.file_checksum(tmp_path / "f", "sha256") == hashlib.sha256(data).hexdigest()


def test_two_ranks_share_the_hashing_and_both_refuse_a_damaged_file(pools, model_dir, tmp_path):
    path = tmp_path / "ring2.kv"
    pools(2).run(session_bodies.ask_after_prefill, model_dir, dict(ring=2, chunk_size=16), DOC, QUESTIONS[:1], NEW,
                 str(path))
    assert pools(2).run(session_bodies.load_refusal, model_dir, dict(ring=2), str(path)) == ["", ""]
    file = path / "rank-00001.safetensors"  # hashed by rank 1 alone
    data = bytearray(file.read_bytes())
    data[-3] ^= 0x10
    file.write_bytes(bytes(data))
    for message in pools(2).run(session_bodies.load_refusal, model_dir, dict(ring=2), str(path)):
        assert "rank-00001.safetensors is damaged" in message and "\n" not in message, message
