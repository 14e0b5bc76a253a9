"""A model's name: the one rule for every place it appears.

The name `tierline models import --name` writes (else SRC's folder name) is what a request's `model` field
names (gRPC and the OpenAI API), what `GET /v1/models/{name}` asks for, and what a signed update manifest
carries to the boards (`tierline devices set-model`, device_agent/ota.py). The importer refuses a name by this
rule, the boards refuse an update by it and a manifest's `model_name` is checked by it at load
(shared/config/manifest.py), so a name that imports is a name every one of them takes.

It is no stricter than they need. NATS never sees a name: the fleet's KV keys are device ids and its object
names SHA-256s, and the name travels inside a JSON payload. So spaces, ':', '+', '@', letters of any script
and Hugging Face's `org/model` are names. What is refused breaks somewhere:
- more than a request's `model` field takes (`limits.max_id_chars`' default, as `tierline up` writes it);
- text that is not UTF-8 (protobuf strings take nothing else);
- control and invisible characters (httpx refuses control characters in a URL; an invisible one cannot be
  typed from any listing);
- '?', '#' and '%': the `openai` client puts the name into the URL path as it is (`f"/models/{model}"`), where
  they would start a query or a fragment or be read as an escape;
- an empty, '.' or '..' part between '/'s: URL clients remove dot segments and proxies merge slashes.
"""

from __future__ import annotations

from tierline_shared.config.manifest import LimitsConfig

MAX_NAME_CHARS = LimitsConfig.max_id_chars  # the default: the serving manifest is not known at import time
URL_SPECIALS = "?#%"  # a query, a fragment, an escape: what a name sent unescaped in a URL path would become
DOT_PARTS = ("", ".", "..")  # parts between '/'s that a URL client or a proxy drops


class ModelNameError(ValueError):
    """A name no request, URL or board could carry. The message is a predicate ("is 129 characters; ..."): the
    caller puts the field and the name before it."""


def check_model_name(name: object) -> str:
    """`name` if every place a model's name appears takes it; ModelNameError saying why not."""
    if not isinstance(name, str):
        raise ModelNameError(f"is not a string ({type(name).__name__})")
    if not name:
        raise ModelNameError("is empty")
    if len(name) > MAX_NAME_CHARS:
        raise ModelNameError(f"is {len(name)} characters; a request's model field takes at most {MAX_NAME_CHARS} "
                             "(limits.max_id_chars)")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ModelNameError("is not UTF-8 text") from None
    hidden = next((c for c in name if not c.isprintable()), None)
    if hidden is not None:
        raise ModelNameError(f"holds a control or invisible character (U+{ord(hidden):04X})")
    special = next((c for c in name if c in URL_SPECIALS), None)
    if special is not None:
        raise ModelNameError(f"holds {special!r}: clients send a model's name unescaped in a URL path "
                             f"(GET /v1/models/NAME), where {special!r} ends or changes it")
    if any(part in DOT_PARTS for part in name.split("/")):
        raise ModelNameError("has an empty, '.' or '..' part between '/'s: URL clients and proxies drop them")
    return name
