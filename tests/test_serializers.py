"""The embed inputs' serializers build their fields once per class and give every instance its
own bound copies, so that one request's validation never sees another's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType

import pytest

from embeddings import serializers as io


def test_it_gives_each_instance_its_own_fields_bound_to_it() -> None:
    first = io.OpenAIEmbeddingInputSerializer(data={"input": "a"})
    second = io.OpenAIEmbeddingInputSerializer(data={"input": "b"})
    assert set(first.fields) == {
        "prompt_name",
        "dimensions",
        "truncate",
        "truncation_direction",
        "input",
        "model",
        "encoding_format",
        "user",
    }
    for name, field in first.fields.items():
        assert field is not second.fields[name]
        assert field.parent is first
        assert second.fields[name].parent is second
        assert field.field_name == name


def test_it_validates_and_refuses_as_before_when_instances_share_prototypes() -> None:
    def validate(index: int) -> tuple[bool, dict[str, object]]:
        data = {"texts": [f"text {index}"], "dimensions": 8} if index % 2 else {"texts": []}
        serializer = io.BatchEmbedInputSerializer(data=data)
        valid = serializer.is_valid()
        return valid, dict(serializer.validated_data) if valid else dict(serializer.errors)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(validate, range(200)))
    for index, (valid, outcome) in enumerate(results):
        if index % 2:
            assert valid
            assert outcome["texts"] == [f"text {index}"]
            assert outcome["dimensions"] == 8
        else:
            assert not valid
            assert set(outcome) == {"texts"}


def test_it_keeps_each_serializer_class_fields_apart() -> None:
    embed = io.EmbedInputSerializer(data={"text": "a"})
    batch = io.BatchEmbedInputSerializer(data={"texts": ["a"]})
    assert "text" in embed.fields
    assert "texts" not in embed.fields
    assert "texts" in batch.fields
    assert "text" not in batch.fields
    assert embed.is_valid()
    assert batch.is_valid()


BODIES: list[dict[str, object]] = [
    {"input": "a query"},
    {"input": ["one", "two"], "model": "m", "encoding_format": "base64", "user": "u"},
    {"input": [[1, 2, 3]], "dimensions": 8, "prompt_name": "query", "truncate": False},
    {"input": "a", "dimensions": None, "prompt_name": None, "truncate": None, "model": None},
    {"input": "a", "truncation_direction": "left", "unknown": 1},
    {},
    {"input": ""},
    {"input": 5, "dimensions": "8", "truncate": "yes", "encoding_format": "hex"},
    {"input": "a", "truncation_direction": None, "encoding_format": None, "user": 3},
    {"text": "one text", "normalize": False},
    {"text": " ", "normalize": "no"},
    {"text": "a", "dimensions": 0, "prompt_name": "x" * 65},
    {"texts": ["a", "b"], "dimensions": 4},
    {"texts": [], "normalize": None},
    {"texts": ["a", 1]},
    {"texts": "a"},
]


def outcome(serializer: io.PrototypeFieldsSerializer) -> tuple[bool, list[tuple[str, object]]]:
    """Whether it is valid, and its values or errors in their order."""
    valid = serializer.is_valid()
    return valid, list((serializer.validated_data if valid else serializer.errors).items())


@pytest.mark.parametrize(
    "serializer_class",
    [io.OpenAIEmbeddingInputSerializer, io.EmbedInputSerializer, io.BatchEmbedInputSerializer],
)
@pytest.mark.parametrize("body", BODIES)
def test_it_validates_a_json_object_exactly_as_drf_does(
    serializer_class: type[io.PrototypeFieldsSerializer], body: dict[str, object]
) -> None:
    # A read-only mapping is not a dict: DRF's own path validates it.
    drf_path = outcome(serializer_class(data=MappingProxyType(body)))
    assert outcome(serializer_class(data=body)) == drf_path


def test_it_binds_no_copy_of_the_fields_a_json_object_leaves_out() -> None:
    serializer = io.OpenAIEmbeddingInputSerializer(data={"input": "a query"})

    assert serializer.is_valid()

    assert "fields" not in serializer.__dict__  # DRF's cached set of bound copies: never built
    assert serializer.validated_data == {
        "input": ["a query"],
        "truncate": None,
        "truncation_direction": "right",
        "encoding_format": "float",
    }
