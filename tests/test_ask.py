"""`lctk ask` on the demo model: the chat template is split so that the document's ids are a
true prefix; each answer equals transformers' greedy generate on document + question ids;
--cache saves, loads (also on 2 ranks under deepspeed, ring=2), and says why it prefills."""
import json

import pytest
import torch
from click.testing import CliRunner

from helpers import deepspeed, demo_folder, launch, one_error_line, only_json
from toolkit.cli import cli

LEASE = ("The lease between Ada Okafor and the harbour authority runs from 2024 to 2030.\n\n"
         "The rent is 400 a month, paid on the first day of each month.\n\n"
         "Either side may end it with six months' notice in writing.")
QUESTIONS = ["Who signed the lease?", "How much is the rent?"]
NEW = 10


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def demo():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = demo_folder()
    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def hf_answer(model, ids: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=NEW, do_sample=False)
    return out[0, len(ids):].tolist()


def test_the_document_ids_are_a_true_prefix_of_the_chat_prompt(demo):
    from toolkit.sessions.session import document_ids, question_ids

    tok, _ = demo
    doc, q = document_ids(tok, LEASE, True), question_ids(tok, QUESTIONS[0], True)
    whole = tok.apply_chat_template([{"role": "user", "content": f"{LEASE}\n\n{QUESTIONS[0]}"}],
                                    add_generation_prompt=True, tokenize=False)
    assert tok.decode(doc + q) == whole  # one user turn: document, blank line, question; then the reply starts
    assert tok.decode(doc) == whole[: whole.index(LEASE) + len(LEASE)]
    assert document_ids(tok, LEASE + "\n\n", True) == doc


@pytest.fixture(scope="module")
def asked(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ask")
    (folder / "lease.txt").write_text(LEASE)
    args = [folder / "lease.txt", "--model", demo_folder(), "--max-new-tokens", NEW, "--json",
            "--cache", folder / "lease.kv", *[x for q in QUESTIONS for x in ("-q", q)]]
    first = invoke("ask", *args)
    assert first.exit_code == 0, first.output
    second = invoke("ask", *args)
    assert second.exit_code == 0, second.output
    return folder, args, first, second


def test_answers_equal_greedy_generate_on_document_plus_question(demo, asked):
    from toolkit.sessions.session import document_ids, question_ids

    tok, model = demo
    _, _, first, _ = asked
    payload = json.loads(first.stdout)
    assert [a["question"] for a in payload["answers"]] == QUESTIONS
    for answer in payload["answers"]:
        ids = document_ids(tok, LEASE, True) + question_ids(tok, answer["question"], True)
        assert answer["token_ids"] == hf_answer(model, ids), answer["question"]
        assert answer["ttft_s"] > 0 and answer["decode_s"] > 0
    assert payload["document_tokens"] == len(document_ids(tok, LEASE, True)) and payload["prefill_s"] > 0


def test_cache_is_saved_then_loaded_with_the_same_answers(asked):
    folder, _, first, second = asked
    one, two = json.loads(first.stdout), json.loads(second.stdout)
    assert one["cache"]["loaded"] is False and "no cache in" in one["cache"]["why"]
    assert one["cache"]["saved"] == str(folder / "lease.kv") and (folder / "lease.kv" / "manifest.json").is_file()
    assert two["cache"]["loaded"] is True and two["cache"]["saved"] is None and "loaded from" in second.stderr
    assert [a["token_ids"] for a in two["answers"]] == [a["token_ids"] for a in one["answers"]]


def test_a_cache_for_another_document_says_so_and_prefills(asked, tmp_path):
    folder, args, first, _ = asked
    import shutil

    other = tmp_path / "other.txt"
    other.write_text(LEASE.replace("400", "500"))
    cache = shutil.copytree(folder / "lease.kv", tmp_path / "lease.kv")
    at = args.index("--cache")
    result = invoke("ask", other, *args[1:at], "--cache", cache, *args[at + 2:])
    assert result.exit_code == 0, result.output
    assert "was saved for another document; prefilling the document" in result.stderr
    payload = json.loads(result.stdout)
    assert payload["cache"]["loaded"] is False and payload["cache"]["saved"] == str(cache)  # now for this one
    again = invoke("ask", other, *args[1:at], "--cache", cache, *args[at + 2:])
    assert json.loads(again.stdout)["cache"]["loaded"] is True


def test_batch_gives_the_same_answers_printed_in_order(asked):
    _, args, first, _ = asked
    result = invoke("ask", *args, "--batch")
    assert result.exit_code == 0, result.output
    assert [a["token_ids"] for a in json.loads(result.stdout)["answers"]] == \
        [a["token_ids"] for a in json.loads(first.stdout)["answers"]]
    text = invoke("ask", *[a for a in args if a != "--json"], "--batch", 2)
    assert text.exit_code == 0, text.output
    answers = [a["text"].strip() for a in json.loads(first.stdout)["answers"]]
    assert text.stdout == "".join(f"> {q}\n{a}\n\n" for q, a in zip(QUESTIONS, answers))


def test_the_cache_loads_on_2_ranks_with_the_same_answers_decoded_as_one_batch(asked):
    folder, args, first, _ = asked
    proc = launch(deepspeed("ask", *[str(a) for a in args], "--batch"))
    payload = only_json(proc.stdout)
    assert payload["layout"]["ring"] == 2 and payload["cache"]["loaded"] is True
    assert [a["token_ids"] for a in payload["answers"]] == [a["token_ids"] for a in json.loads(first.stdout)["answers"]]


@pytest.mark.parametrize("args, words", [
    (["{d}/lease.txt"], "give at least one question"),
    (["{d}/lease.txt", "--questions-file", "{d}/none.txt"], "cannot be read"),
    (["{d}/missing.txt", "-q", "x"], "does not exist"),
    (["{d}/lease.txt", "-q", "x", "--cache", "{d}/notes"], "is not a saved document cache"),
])
def test_bad_input_is_one_line(asked, args, words):
    folder = asked[0]
    (folder / "notes").mkdir(exist_ok=True)
    (folder / "notes" / "mine.txt").write_text("keep me")
    result = invoke("ask", *[a.format(d=folder) for a in args], "--model", folder / "no-model")
    assert result.exit_code in (1, 2) and words in one_error_line(result), result.output
    assert (folder / "notes" / "mine.txt").read_text() == "keep me"


def test_summarize_save_cache_is_questioned_next(tmp_path):
    doc = tmp_path / "lease.txt"
    doc.write_text(LEASE)
    summary = invoke("summarize", doc, "--model", demo_folder(), "--max-new-tokens", 6, "--json",
                     "--save-cache", tmp_path / "kv")
    assert summary.exit_code == 0, summary.output
    assert json.loads(summary.stdout)["mode"] == "single" and "question it with `lctk ask" in summary.stderr
    asked = invoke("ask", doc, "--model", demo_folder(), "--max-new-tokens", 4, "--json", "--cache",
                   tmp_path / "kv", "-q", QUESTIONS[0])
    assert asked.exit_code == 0, asked.output
    assert json.loads(asked.stdout)["cache"]["loaded"] is True
