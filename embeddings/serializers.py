"""Input and output shapes of the embed APIs.

Fields are strict: a number is not a string and a string is not a number, so that a client's bug
shows up as a 422 naming the field instead of an embedding of "123".

Each field's OpenAPI description states exactly what its validation accepts: static constraints
are annotated here, and those that depend on the served model or the settings (the most
dimensions, the prompt names, the model names, the most texts) are filled in per generated
document by embeddings/schema_fields.py's extensions, which target the field classes below.
"""

from __future__ import annotations

from typing import Any, ClassVar

from django.core.exceptions import ValidationError as DjangoValidationError
from django.core.validators import ProhibitNullCharactersValidator
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.fields import SkipField, empty, get_error_detail

from embedplatform.error_codes import CATALOGUE

ENCODING_FORMATS = ("float", "base64")
TRUNCATION_DIRECTIONS = ("right", "left")
# What check_text accepts, as JSON Schema: at least one character that is not whitespace.
TEXT_SCHEMA: dict[str, Any] = {"type": "string", "minLength": 1, "pattern": r"\S"}


def _field_error(code: str) -> serializers.ValidationError:
    return serializers.ValidationError(CATALOGUE[code].detail(), code=code)


def check_text(value: str) -> str:
    if not value.strip():
        raise _field_error("empty_text")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        # JSON can smuggle in lone surrogates ("\ud800"), which are not text and no tokenizer takes.
        raise _field_error("surrogate_characters_not_allowed") from exc
    return value


class StrictCharField(serializers.CharField):
    def to_internal_value(self, data: Any) -> str:
        if not isinstance(data, str):
            self.fail("invalid")
        return super().to_internal_value(data)


@extend_schema_field(TEXT_SCHEMA)
class TextField(StrictCharField):
    """A text to embed: a non-empty string of valid Unicode, kept exactly as sent."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("trim_whitespace", False)
        super().__init__(**kwargs)
        # A NUL is odd but harmless text: tokenizers take it, so it is embedded like the rest.
        self.validators = [
            v for v in self.validators if not isinstance(v, ProhibitNullCharactersValidator)
        ]

    def run_validation(self, data: Any = serializers.empty) -> Any:
        if data == "":
            check_text(data)  # empty_text: clearer than CharField's "may not be blank"
        value = super().run_validation(data)
        return check_text(value) if isinstance(value, str) else value


class StrictIntegerField(serializers.IntegerField):
    def to_internal_value(self, data: Any) -> int:
        if isinstance(data, bool) or not isinstance(data, int):
            self.fail("invalid")
        return super().to_internal_value(data)


class StrictBooleanField(serializers.BooleanField):
    def to_internal_value(self, data: Any) -> bool:
        if not isinstance(data, bool):
            self.fail("invalid")
        return data


class PromptNameField(StrictCharField):
    """One of the served model's prompt names (checked by services.resolve_prompt)."""


class DimensionsField(StrictIntegerField):
    """1 to the served model's dimensions (checked by services.resolve_dimensions)."""


class ModelNameField(StrictCharField):
    """The served model's name or an alias (checked by the OpenAI view)."""


class TextListField(serializers.ListField):
    """Texts; at most MAX_TEXTS_PER_REQUEST, or the tenant's lower limit (checked by
    services.embed, which answers 413; on /v1 at most OPENAI_MAX_INPUTS_PER_REQUEST, 400)."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("child", TextField())
        kwargs.setdefault("allow_empty", False)
        super().__init__(**kwargs)


# Fields' `get_value`s that read a plain dict as `data.get(name, empty)` does.
_DICT_GET_VALUES = (serializers.Field.get_value, serializers.ListField.get_value)


class PrototypeFieldsSerializer(serializers.Serializer):
    """A serializer that builds its fields once per class, then gives each instance shallow
    copies of them, and only of the fields a body holds.

    DRF deep-copies every declared field for every instance, which re-runs each field's
    __init__: 60-80 us of the 90-120 us an embed request's validation took (Intel, one text).
    The copies share only what validation reads and never changes (choices, limits, messages,
    a list's child field); each is bound to its own serializer as usual.

    Validating a JSON object (`to_internal_value`), a field the body leaves out gives its
    constant default, or nothing, as DRF's own path would have it, without a copy bound and
    run for it to say so: an OpenAI request names one or two of eight fields. Form data (the
    browsable API), partial updates, and fields with a source, a validate_<field> method or a
    callable default of their own take DRF's path."""

    _prototypes: ClassVar[dict[type, dict[str, serializers.Field]]] = {}
    # Per class: whether its fields are all plain enough for `to_internal_value`'s own path.
    _plain: ClassVar[dict[type, bool]] = {}

    def get_fields(self) -> dict[str, serializers.Field]:
        return {name: _shallow_copy(field) for name, field in self._prototype_fields().items()}

    def _prototype_fields(self) -> dict[str, serializers.Field]:
        prototypes = self._prototypes.get(type(self))
        if prototypes is None:
            prototypes = self._prototypes.setdefault(type(self), super().get_fields())
        return prototypes

    def _has_plain_fields(self) -> bool:
        plain = self._plain.get(type(self))
        if plain is None:
            plain = self._plain.setdefault(
                type(self),
                all(
                    not field.read_only
                    and field.source is None
                    and (field.default is empty or not callable(field.default))
                    and type(field).get_value in _DICT_GET_VALUES
                    and not hasattr(self, f"validate_{name}")
                    for name, field in self._prototype_fields().items()
                ),
            )
        return plain

    def to_internal_value(self, data: Any) -> dict[str, Any]:
        if type(data) is not dict or self.root.partial or not self._has_plain_fields():
            return dict(super().to_internal_value(data))
        values: dict[str, Any] = {}
        errors: dict[str, Any] = {}
        for name, prototype in self._prototype_fields().items():
            if name not in data and not prototype.required:
                if prototype.default is not empty:
                    values[name] = prototype.default
                continue  # DRF's SkipField
            field = _shallow_copy(prototype)
            field.bind(name, self)
            try:
                values[name] = field.run_validation(data.get(name, empty))
            except serializers.ValidationError as exc:
                errors[name] = exc.detail
            except DjangoValidationError as exc:
                errors[name] = get_error_detail(exc)
            except SkipField:
                pass
        if errors:
            raise serializers.ValidationError(errors)
        return values

    def run_validators(self, value: Any) -> None:
        # DRF first adds the read-only fields' defaults, which binds a copy of every field,
        # to hand them to the serializer's own validators: these have none.
        if self.validators:
            super().run_validators(value)


def _shallow_copy(field: serializers.Field) -> serializers.Field:
    clone: serializers.Field = object.__new__(type(field))
    clone.__dict__.update(field.__dict__)
    return clone


class PromptAndDimensionsSerializer(PrototypeFieldsSerializer):
    """The options every embed endpoint takes, OpenAI's included: prompt, dimensions and
    truncation."""

    prompt_name = PromptNameField(
        required=False,
        allow_null=True,
        max_length=64,
        help_text="A task prompt of the model (EmbeddingGemma: query, document, Clustering, STS, "
        "...). See GET /health for the model's prompt names.",
    )
    dimensions = DimensionsField(
        required=False,
        allow_null=True,
        min_value=1,
        help_text="Matryoshka truncation: keep the first N dimensions (1 to the model's own, e.g. "
        "768, 512, 256 or 128 for EmbeddingGemma), re-normalised to unit length.",
    )

    truncate = StrictBooleanField(
        required=False,
        allow_null=True,
        default=None,
        help_text="Whether an input longer than the model reads (its max_seq_length tokens, "
        "see GET /health) is cut to fit (true) or refused (false: 422, 400 on /v1). Unset: "
        "the server's TRUNCATE_INPUTS (true by default). Cut inputs are counted in the "
        "x-truncated-inputs header.",
    )
    truncation_direction = serializers.ChoiceField(
        choices=TRUNCATION_DIRECTIONS,
        required=False,
        default="right",
        help_text="Which end of an over-long input is cut: right keeps its start, left its end "
        "(a task prompt is always kept).",
    )


class EmbedOptionsSerializer(PromptAndDimensionsSerializer):
    normalize = StrictBooleanField(
        required=False, default=True, help_text="Scale each embedding to unit length."
    )


class EmbedInputSerializer(EmbedOptionsSerializer):
    text = TextField(help_text="The text to embed.")


class BatchEmbedInputSerializer(EmbedOptionsSerializer):
    texts = TextListField(
        help_text="The texts to embed (at most MAX_TEXTS_PER_REQUEST, default 256, or the "
        "tenant's own lower limit; more is a 413)."
    )


class UsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField(
        help_text="Tokens embedded (the texts with their prompt and special tokens, after "
        "truncation), as charged to the tenant's quota."
    )
    total_tokens = serializers.IntegerField(help_text="The same: embedding has no output tokens.")


class EmbedOutputSerializer(serializers.Serializer):
    embedding = serializers.ListField(
        child=serializers.FloatField(), help_text="The embedding, `dimensions` floats."
    )
    model = serializers.CharField(help_text="The model that made it.")
    dimensions = serializers.IntegerField(help_text="The embedding's length.")
    truncated = serializers.BooleanField(
        help_text="Whether the text was cut to the model's max_seq_length tokens."
    )
    usage = UsageSerializer(help_text="What the request was charged.")


class BatchEmbedOutputSerializer(serializers.Serializer):
    embeddings = serializers.ListField(
        child=serializers.ListField(child=serializers.FloatField()),
        help_text="One embedding per text, in the order of `texts`.",
    )
    model = serializers.CharField(help_text="The model that made them.")
    dimensions = serializers.IntegerField(help_text="The length of each embedding.")
    truncated = serializers.ListField(
        child=serializers.BooleanField(),
        help_text="Per text, in the order of `texts`: whether it was cut to the model's "
        "max_seq_length tokens.",
    )
    usage = UsageSerializer(help_text="What the request was charged.")


class OpenAIInputField(serializers.Field):
    """OpenAI's `input`: a string, an array of strings, an array of token ids, or an array of
    token-id arrays. Internally a list whose items are strings or lists of token ids."""

    default_error_messages = {
        code: CATALOGUE[code].detail(variant)
        for code, variant in (("invalid", 3), ("empty", 0), ("mixed", 0))
    }

    def to_internal_value(self, data: Any) -> list[str | list[int]]:
        if isinstance(data, str):
            return [check_text(data)]
        if not isinstance(data, list):
            self.fail("invalid")
        if not data:
            self.fail("empty")
        if all(_is_token_id(item) for item in data):
            return [list(data)]
        items: list[str | list[int]] = []
        for item in data:
            if isinstance(item, str):
                items.append(check_text(item))
            elif isinstance(item, list) and all(_is_token_id(i) for i in item):
                if not item:
                    self.fail("empty")
                items.append(list(item))
            else:
                self.fail("invalid")
        if len({type(item) for item in items}) > 1:
            self.fail("mixed")
        return items

    def to_representation(self, value: Any) -> Any:
        return value


def _is_token_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class OpenAIEmbeddingInputSerializer(PromptAndDimensionsSerializer):
    """OpenAI's request; `prompt_name` is ours, as on /embed."""

    input = OpenAIInputField(
        help_text="A string, an array of strings, or token-id array(s) (tiktoken cl100k_base "
        "ids unless TOKEN_ID_INPUT=native); at most OPENAI_MAX_INPUTS_PER_REQUEST (2048) "
        "items, or the tenant's lower limit."
    )
    model = ModelNameField(
        required=False,
        allow_null=True,
        max_length=255,
        help_text="The served model's name or one of its aliases; another is a 404.",
    )
    encoding_format = serializers.ChoiceField(
        choices=ENCODING_FORMATS,
        required=False,
        default="float",
        help_text="float, or base64 of little-endian float32 (what the openai client asks for).",
    )
    user = StrictCharField(
        required=False,
        allow_null=True,
        allow_blank=True,
        max_length=256,
        help_text="OpenAI's end-user id; accepted for compatibility and not used.",
    )


@extend_schema_field(
    {
        "oneOf": [
            {"type": "array", "items": {"type": "number", "format": "float"}},
            {"type": "string", "format": "byte"},
        ]
    }
)
class EmbeddingField(serializers.JSONField):
    """Floats, or (`encoding_format: base64`) base64 of the little-endian float32 values."""


class OpenAIEmbeddingSerializer(serializers.Serializer):
    object = serializers.CharField(default="embedding", help_text="Always `embedding`.")
    index = serializers.IntegerField(help_text="The position of its text in `input`.")
    embedding = EmbeddingField(
        help_text="The embedding: floats, or (`encoding_format: base64`) base64 of the "
        "little-endian float32 values."
    )


class OpenAIUsageSerializer(serializers.Serializer):
    prompt_tokens = serializers.IntegerField(
        help_text="Tokens embedded (after truncation), as charged to the tenant's quota."
    )
    total_tokens = serializers.IntegerField(help_text="The same as `prompt_tokens`.")


class OpenAIEmbeddingOutputSerializer(serializers.Serializer):
    object = serializers.CharField(default="list", help_text="Always `list`.")
    data = OpenAIEmbeddingSerializer(many=True, help_text="One item per input, in order.")  # type: ignore[assignment]
    model = serializers.CharField(help_text="The model that made them.")
    usage = OpenAIUsageSerializer(help_text="What the request was charged.")


# --- /tokenize and /decode (text-embeddings-inference's) -----------------------------------------
class TokenizeInputsField(serializers.Field):
    """A text, or a list of texts (TEI's `inputs`); internally always a list."""

    default_error_messages = {
        "invalid": CATALOGUE["invalid"].detail(4),
        "empty": CATALOGUE["empty"].detail(),
    }

    def to_internal_value(self, data: Any) -> list[str]:
        if isinstance(data, str):
            return [check_text(data)]
        if not isinstance(data, list):
            self.fail("invalid")
        if not data:
            self.fail("empty")
        if not all(isinstance(item, str) for item in data):
            self.fail("invalid")
        return [check_text(item) for item in data]

    def to_representation(self, value: Any) -> Any:
        return value


class TokenizeInputSerializer(serializers.Serializer):
    inputs = TokenizeInputsField(
        help_text="A text, or a list of texts (at most the tenant's texts per request)."
    )
    add_special_tokens = StrictBooleanField(
        required=False,
        default=True,
        help_text="Include the model's special tokens ([CLS], [SEP], <bos>, ...), as the model "
        "reads them.",
    )
    return_offsets = StrictBooleanField(
        required=False,
        default=False,
        help_text="Also return each token's text and character offsets (`pieces`).",
    )


class TokenPieceSerializer(serializers.Serializer):
    id = serializers.IntegerField(help_text="The token id.")
    text = serializers.CharField(help_text="`input[start:stop]`; empty for a special token.")
    special = serializers.BooleanField(help_text="Whether it is a special token.")
    start = serializers.IntegerField(help_text="Offset of its first character in the text.")
    stop = serializers.IntegerField(help_text="Offset just past its last character.")


class TokenizedTextSerializer(serializers.Serializer):
    ids = serializers.ListField(
        child=serializers.IntegerField(), help_text="The text's token ids, never truncated."
    )
    pieces = TokenPieceSerializer(
        many=True, required=False, help_text="With `return_offsets`: one item per id."
    )


class TokenizeOutputSerializer(serializers.Serializer):
    data = TokenizedTextSerializer(many=True, help_text="One item per text, in order.")  # type: ignore[assignment]
    model = serializers.CharField(help_text="The served model, whose tokenizer this is.")
    max_seq_length = serializers.IntegerField(
        help_text="The most tokens per input the model reads (special tokens and prompt "
        "included); longer inputs are truncated or refused (`truncate`)."
    )


class DecodeIdsField(serializers.Field):
    """Token ids, or a list of token-id lists; internally always a list of lists."""

    default_error_messages = {
        "invalid": CATALOGUE["invalid"].detail(5),
        "empty": CATALOGUE["empty"].detail(),
    }

    def to_internal_value(self, data: Any) -> list[list[int]]:
        if not isinstance(data, list):
            self.fail("invalid")
        if not data:
            self.fail("empty")
        rows = [data] if all(_is_token_id(item) for item in data) else data
        for row in rows:
            if not isinstance(row, list) or not all(_is_token_id(item) for item in row):
                self.fail("invalid")
            if not row:
                self.fail("empty")
        return [list(row) for row in rows]

    def to_representation(self, value: Any) -> Any:
        return value


class DecodeInputSerializer(serializers.Serializer):
    ids = DecodeIdsField(
        help_text="Token ids of the served model, or a list of such lists (at most the "
        "tenant's texts per request)."
    )


class DecodeOutputSerializer(serializers.Serializer):
    texts = serializers.ListField(
        child=serializers.CharField(),
        help_text="One text per id list, in order; special tokens are left out.",
    )
    model = serializers.CharField(help_text="The served model, whose tokenizer this is.")
