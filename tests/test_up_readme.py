"""`tierline up` as a user runs it, the README's examples against it, and clients nobody here wrote.

One platform from infra/manifests/local.yaml, started by `tierline up` in a process of its own (its
ports turned to 0 here: other platforms may hold 50050 and 8080 on this machine; the README's snippets
get the ports it printed in their place, and the key it printed for YOUR_API_KEY). Against it: the
README's SDK and OpenAI snippets as written, `tierline keys create` without `--manifest` (the running
platform's key store), LangChain's ChatOpenAI and completions class OpenAI (streaming included) and
litellm (from its own venv, `make clients`: its pins do not fit .venv's).

Offline: langchain-openai counts tokens with tiktoken only when asked to (get_num_tokens, or the
completions class's max_tokens=-1), which would download its encodings; the calls here set
max_tokens and never count, and TIKTOKEN_CACHE_DIR points at an empty folder, so a download would fail
the test. litellm reads its model cost map from its own package with LITELLM_LOCAL_MODEL_COST_MAP=True
(else it tries GitHub first).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest
import yaml

from tests.conftest import COMMITTED_MODELS, ROOT
from tierline_infra.supervisor import REFERENCE_MANIFEST, terminate

MODEL = "tierline-reasoner"
README = ROOT / "README.md"
START_TIMEOUT_S = 300
CLIENTS_PYTHON = ROOT / ".venv-clients" / "bin" / "python"


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, re.S)


@pytest.fixture(scope="module")
def up(tmp_path_factory):
    """`tierline up --manifest <local.yaml, ports 0>` in a folder of its own (its runs/ state there); yields
    (router gRPC address, OpenAI base URL, the key it printed, its output, its working folder)."""
    cwd = tmp_path_factory.mktemp("up")
    data = yaml.safe_load(REFERENCE_MANIFEST.read_text())
    data["nats"]["url"] = "tls://127.0.0.1:0"
    for section in [data["router"], *data["tiers"].values()]:
        section.update({k: 0 for k in ("grpc_port", "http_port", "metrics_port") if k in section})
    manifest = cwd / "local.yaml"
    manifest.write_text(yaml.safe_dump(data, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "250", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "tierline", "up", "--models", str(COMMITTED_MODELS),
                             "--manifest", str(manifest)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    out, deadline = [], time.monotonic() + START_TIMEOUT_S
    try:
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            out.append(line)
            if "Stop with Ctrl-C" in line:
                break
        text = "".join(out)
        assert "Stop with Ctrl-C" in text, text[-3000:]
        router = re.search(r"Router \(gRPC\): (127\.0\.0\.1:\d+)", text).group(1)
        http = re.search(r"OpenAI-compatible API: (http://127\.0\.0\.1:\d+/v1)", text).group(1)
        key = re.search(r"API key \(pro plan, shown once\): (\S+)", text).group(1)
        yield router, http, key, text, cwd
    finally:
        terminate(proc, timeout_s=60)  # `tierline up` stops its whole platform first: killed early, it leaves orphans


def test_up_takes_local_yaml_when_no_manifest_is_given(monkeypatch, tmp_path):
    """`make up` runs `tierline up` without --manifest: the ports must be local.yaml's (issue 26: it picked
    free ones, and the README's examples on 50050 and 8080 failed)."""
    from tierline import demo

    seen = {}

    class Stop(Exception):
        pass

    def stack(*_args, ports_from=None, **_kwargs):
        seen["ports_from"] = ports_from
        raise Stop

    monkeypatch.setattr(demo, "Stack", stack)
    with pytest.raises(Stop):
        demo.up(COMMITTED_MODELS, tmp_path / "up.pid")
    assert seen["ports_from"] == REFERENCE_MANIFEST
    ports = yaml.safe_load(REFERENCE_MANIFEST.read_text())["router"]
    assert (ports["grpc_port"], ports["http_port"]) == (50050, 8080)  # what the README's examples use


def test_up_prints_every_endpoint(up):
    *_, text, _ = up
    for process in ("router", "cloud-0", "edge-0", "device-0"):
        row = next((line for line in text.splitlines() if re.search(rf"\b{process}\b", line)), "")
        assert re.search(r"127\.0\.0\.1:\d+", row) and re.search(r"http://127\.0\.0\.1:\d+/metrics", row), \
            (process, text)
    assert re.search(r"router.*http://127\.0\.0\.1:\d+/v1", text)


def test_the_readmes_sdk_and_openai_examples_run_as_written(up):
    router, http, key, _, _ = up
    blocks = python_blocks(README.read_text())
    sdk = next(b for b in blocks if "InferenceClient(" in b)
    oai = next(b for b in blocks if "openai.OpenAI(" in b)
    assert "127.0.0.1:50050" in sdk and "http://127.0.0.1:8080/v1" in oai  # local.yaml's ports, as written
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for code in (sdk.replace("127.0.0.1:50050", router), oai.replace("http://127.0.0.1:8080/v1", http)):
        code = code.replace("YOUR_API_KEY", key)
        run = subprocess.run([sys.executable, "-c", code], env=env, text=True, capture_output=True, timeout=120)
        assert run.returncode == 0, (code, run.stderr[-2000:])
        assert run.stdout.strip() or "print(" not in code, (code, run.stdout)


def test_keys_create_without_a_manifest_writes_the_running_platforms_store(up):
    import openai

    _, http, _, _, cwd = up
    made = subprocess.run([sys.executable, "-m", "tierline", "keys", "create", "--plan", "free", "--json"],
                          cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT)}, text=True, capture_output=True,
                          timeout=120)
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)["key"]
    client = openai.OpenAI(api_key=key, base_url=http, max_retries=0, timeout=60)
    assert client.completions.create(model=MODEL, prompt="Q:2+3=?\nA:", max_tokens=4).choices[0].text


def test_the_articles_call_and_the_context_bound(up):
    import openai

    _, http, key, _, _ = up
    client = openai.OpenAI(api_key=key, base_url=http, max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "2+3=?"}]
    resp = client.chat.completions.create(model=MODEL, messages=messages, temperature=0.3, max_tokens=200)
    assert resp.choices[0].message.content and resp.usage.completion_tokens <= 200
    with pytest.raises(openai.BadRequestError) as err:  # the context is 256: 256 more leaves no room
        client.chat.completions.create(model=MODEL, messages=messages, temperature=0.3, max_tokens=256)
    assert err.value.body["param"] == "max_tokens" and "maximum context length is 256" in err.value.body["message"]


@pytest.fixture()
def offline_tiktoken(monkeypatch, tmp_path):
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "tiktoken"))  # empty: a download would be needed


def test_langchain_chat_and_completions_classes(up, offline_tiktoken):
    from langchain_openai import ChatOpenAI, OpenAI

    _, http, key, _, _ = up
    chat = ChatOpenAI(model=MODEL, base_url=http, api_key=key, temperature=0, max_tokens=12, max_retries=0)
    answer = chat.invoke("2+3=?")
    assert answer.content and answer.response_metadata["model_name"] == MODEL
    assert "".join(c.content for c in chat.stream("2+3=?")) == answer.content
    with_lp = ChatOpenAI(model=MODEL, base_url=http, api_key=key, temperature=0, max_tokens=12, max_retries=0,
                         logprobs=True, top_logprobs=2).invoke("2+3=?")
    content = with_lp.response_metadata["logprobs"]["content"]
    assert "".join(t["token"] for t in content) == answer.content
    assert all(t["logprob"] <= 0 and len(t["top_logprobs"]) == 2 for t in content)

    llm = OpenAI(model=MODEL, base_url=http, api_key=key, temperature=0, max_tokens=12, max_retries=0)
    text = llm.invoke("Q:2+3=?\nA:")
    assert text and "".join(llm.stream("Q:2+3=?\nA:")) == text
    sampled = OpenAI(model=MODEL, base_url=http, api_key=key, temperature=1.5, max_tokens=12, max_retries=0, n=3,
                     seed=4).generate(["Q:2+3=?\nA:"])
    assert len(sampled.generations[0]) == 3


def test_litellm(up):
    if not CLIENTS_PYTHON.exists():
        build = subprocess.run(["make", "-s", "clients"], cwd=ROOT, text=True, capture_output=True, timeout=1200)
        assert build.returncode == 0, build.stderr[-2000:]
    _, http, key, _, _ = up
    script = f"""
import json, litellm
args = dict(model="openai/{MODEL}", api_base={http!r}, api_key={key!r}, max_tokens=12, temperature=0,
            messages=[{{"role": "user", "content": "2+3=?"}}])
one = litellm.completion(**args).choices[0].message.content
streamed = "".join(c.choices[0].delta.content or "" for c in litellm.completion(stream=True, **args))
print(json.dumps({{"one": one, "streamed": streamed}}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    run = subprocess.run([str(CLIENTS_PYTHON), "-c", script], text=True, capture_output=True, timeout=300,
                         env={**env, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    import openai

    ref = openai.OpenAI(api_key=key, base_url=http, max_retries=0).chat.completions.create(
        model=MODEL, max_tokens=12, temperature=0, messages=[{"role": "user", "content": "2+3=?"}])
    assert out["one"] == out["streamed"] == ref.choices[0].message.content
