"""Request checks of the OpenAI protocol layer, without a server: a malformed field is a 400
in OpenAI's shape that names it, never a 500 and never a silent reading of it."""
import pytest

from toolkit.serve.protocol import ApiError, parse_params


def params(**body):
    return parse_params(body, "demo", 16, 4096)


@pytest.mark.parametrize("body, field", [
    ({"stream": "false"}, "stream"),                      # a string, not a boolean: it used to stream
    ({"stream": 1}, "stream"),
    ({"stream_options": "yes"}, "stream_options"),
    ({"stream_options": ["include_usage"]}, "stream_options"),
    ({"stream_options": {"include_usage": "true"}}, "stream_options.include_usage"),
])
def test_a_field_of_the_wrong_type_is_a_400_naming_it(body, field):
    with pytest.raises(ApiError) as err:
        params(**body)
    assert err.value.status == 400 and err.value.param == field


def test_booleans_and_their_absence_read_as_meant():
    assert params().stream is False and params(stream=None).stream is False
    got = params(stream=True, stream_options={"include_usage": True})
    assert got.stream is True and got.include_usage is True
    assert params(stream=False, stream_options=None).include_usage is False


@pytest.mark.parametrize("raw", [b'{"prompt": "\\ud800"}', b"[" * 5000, b'{"a": ' + b"[" * 40 + b"]" * 40 + b"}",
                                 b"[1]", b"null", b"", b"\xff", b'{"t": NaN}', b'{"s": ' + b"9" * 5000 + b"}"])
def test_a_body_that_is_no_sound_json_object_is_a_400(raw):
    from toolkit.serve.protocol import parse_body

    with pytest.raises(ApiError) as err:
        parse_body(raw)
    assert err.value.status == 400


def test_token_ids_are_held_to_the_vocabulary_and_text_to_the_character_bound():
    from toolkit.serve.protocol import completion_prompt

    assert completion_prompt(None, [0, 95], 96, 100, 10) == [0, 95]
    for bad in ([96], [-1], [2**70]):
        with pytest.raises(ApiError, match="outside the vocabulary"):
            completion_prompt(None, bad, 96, 100, 10)
    with pytest.raises(ApiError) as err:
        completion_prompt(object(), "x" * 101, 96, 100, 10)
    assert err.value.code == "context_length_exceeded" and "101 characters" in err.value.message


def test_keys_are_tenants_and_salts_keep_them_apart():
    from toolkit.serve.gate import Gate, salt_of

    gate = Gate(["a", "b"], "127.0.0.1", 8000, 100)
    assert [gate.tenant(h) for h in ("Bearer a", "Bearer b", "Bearer c", "")] == ["key0", "key1", None, None]
    assert salt_of("", None) == "" and len({salt_of("key0", None), salt_of("key1", None), salt_of("key0", "x"),
                                            salt_of("", "x")}) == 4


def test_without_a_key_only_local_hosts_and_json_bodies_pass():
    from toolkit.serve.gate import Gate

    gate = Gate([], "127.0.0.1", 8000, 100)
    ok = {"host": "localhost:8000", "content-type": "application/json; charset=utf-8"}
    assert gate.refusal("POST", "/v1/completions", ok, ("127.0.0.1", 8000)) is None
    assert gate.refusal("POST", "/v1/completions", {**ok, "host": "evil.example:8000"}, None).status == 403
    assert gate.refusal("POST", "/v1/completions", {**ok, "host": "localhost:9"}, None).status == 403
    assert gate.refusal("POST", "/v1/completions", {**ok, "content-type": "text/plain"}, None).status == 415
    assert gate.refusal("POST", "/v1/completions", {"host": "localhost:8000"}, None).status == 415
    wide = Gate([], "0.0.0.0", 8000, 100)  # bound to every address: the one a connection came in on is its own
    assert wide.refusal("GET", "/health", {"host": "10.1.2.3:8000"}, ("10.1.2.3", 8000)) is None
