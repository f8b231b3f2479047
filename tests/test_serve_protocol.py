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
