"""`tierline infer|stream|status`: the platform from the command line, through the SDK.

The endpoint and key come from flags or from TIERLINE_ENDPOINT / TIERLINE_API_KEY.
A failed call prints one line with its gRPC status and message and exits 1; a
bad flag exits 2 like every other `tierline` command.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict


def add_parsers(sub, parser_class) -> dict:
    """Register `infer`, `stream` and `status` on the `tierline` subparsers; returns their handlers."""
    from tierline.cli import non_negative_int, positive_float, positive_int
    from tierline_shared.wire import PRIORITIES

    def connection(p) -> None:
        p.add_argument("--endpoint", default=None, help="router, host:port[/v1] (default: $TIERLINE_ENDPOINT "
                                                        "or 127.0.0.1:50050)")
        p.add_argument("--api-key", default=None, help="API key (default: $TIERLINE_API_KEY)")
        p.add_argument("--timeout", type=positive_float("--timeout"), default=30.0, help="seconds for the call")
        p.add_argument("--json", action="store_true", help="one JSON object on stdout")

    for name, what in (("infer", "one answer through the router"), ("stream", "the answer as it is generated")):
        p = sub.add_parser(name, help=what)
        p.add_argument("prompt", help="the question (sent as Q:<question>\\nA:), or the whole prompt with --raw")
        p.add_argument("--raw", action="store_true", help="send the prompt as given (\\n means a newline)")
        p.add_argument("--model", default="", help="model family (default: whatever the router serves)")
        p.add_argument("--temperature", type=float, default=None)
        p.add_argument("--top-p", type=float, default=None)
        p.add_argument("--max-tokens", type=positive_int("--max-tokens"), default=None)
        p.add_argument("--attention-window", type=non_negative_int("--attention-window"), default=None)
        p.add_argument("--seed", type=int, default=None)
        p.add_argument("--priority", choices=PRIORITIES, default=None,
                       help="at most your plan's priority")
        connection(p)
    s = sub.add_parser("status", help="tiers, replicas, queue depth, traffic split and escalation rate, as the "
                                      "router sees them")
    connection(s)
    s.add_argument("--watch", type=positive_float("--watch"), nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="redraw every SECONDS (default 2) until Ctrl-C, like top")
    return {("infer", None): _infer, ("stream", None): _stream, ("status", None): _status}


def _prompt(args) -> str:
    if args.raw:
        return args.prompt.replace("\\n", "\n")
    return f"Q:{args.prompt}\nA:"


def _client(args):
    from tierline.cli import UsageError
    from tierline.client import InferenceClient

    try:
        return InferenceClient(api_key=args.api_key, model_name=getattr(args, "model", ""), endpoint=args.endpoint,
                               timeout=args.timeout)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _parameters(args) -> dict:
    return {k: v for k, v in {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens,
                              "attention_window": args.attention_window, "seed": args.seed}.items() if v is not None}


def _failed(exc) -> int:
    print(f"tierline: error: {exc.status}: {exc.message}", file=sys.stderr)
    return 1


def _summary(c) -> str:
    path = " -> ".join(f"{a.tier} {a.outcome}" for a in c.escalation_path)
    return (f"[tier {c.tier}, {c.usage.prompt_tokens}+{c.usage.completion_tokens} tokens, confidence "
            f"{c.confidence:.2f}{', degraded' if c.degraded else ''}{', cached' if c.cached else ''}"
            f"{f'; {path}' if path else ''}]")


def _infer(args) -> int:
    from tierline.client import TierlineError

    with _client(args) as client:
        try:
            c = client.infer(_prompt(args), _parameters(args), priority=args.priority)
        except TierlineError as exc:
            return _failed(exc)
    if args.json:
        print(json.dumps(asdict(c)))
    else:
        print(c.text)
        print(_summary(c), file=sys.stderr)
    return 0


def _stream(args) -> int:
    from tierline.client import TierlineError

    with _client(args) as client:
        stream = client.stream(_prompt(args), _parameters(args), priority=args.priority)
        try:
            for piece in stream:
                if args.json:
                    print(json.dumps({"text": piece}), flush=True)
                else:
                    print(piece, end="", flush=True)
        except TierlineError as exc:
            print(file=sys.stderr)
            return _failed(exc)
    if args.json:
        print(json.dumps({"final": asdict(stream.response) if stream.response else None}))
    else:
        print()
        if stream.response:
            print(_summary(stream.response), file=sys.stderr)
    return 0


def _as_dict(msg) -> dict:
    """A message as JSON, with 64-bit integers as numbers: proto3's JSON mapping writes them as strings, which
    jq and most scripts reading `--json` do not expect (`"answered": "12"`)."""
    from google.protobuf.descriptor import FieldDescriptor as F
    from google.protobuf.json_format import MessageToDict

    int64 = {F.TYPE_INT64, F.TYPE_UINT64, F.TYPE_FIXED64, F.TYPE_SFIXED64, F.TYPE_SINT64}

    def fix(m, d: dict) -> dict:
        for f in m.DESCRIPTOR.fields:
            if f.json_name not in d:
                continue
            repeated = f.is_repeated
            if f.type in int64:
                d[f.json_name] = [int(v) for v in d[f.json_name]] if repeated else int(d[f.json_name])
            elif f.message_type is not None and not f.message_type.GetOptions().map_entry:
                values = getattr(m, f.name)
                if repeated:
                    d[f.json_name] = [fix(v, dv) for v, dv in zip(values, d[f.json_name])]
                else:
                    d[f.json_name] = fix(values, d[f.json_name])
        return d

    return fix(msg, MessageToDict(msg, always_print_fields_with_no_presence=True))


def _status(args) -> int:
    from tierline import status_view
    from tierline.client import TierlineError

    with _client(args) as client:
        try:
            if args.watch is not None and not args.json:
                status_view.watch(client.status, args.watch)
                return 0
            st = client.status()
        except TierlineError as exc:
            return _failed(exc)
    if args.json:
        print(json.dumps(_as_dict(st)))
    else:
        status_view.show(st)
    return 0
