"""The embed inputs' serializers build their fields once per class and give every instance its
own bound copies, so that one request's validation never sees another's."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

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
