"""The official OpenAI Python SDK against market-router in a real Envoy.

Run by tests/clients.rs, which starts the mock providers and Envoy and passes the base URL:

    python sdk_check.py http://127.0.0.1:PORT

Each check prints `ok <name>`; the first failure raises and ends the run non-zero. The SDK is
used as a client application would use it, with its defaults (httpx, Accept-Encoding: gzip,
deflate), except max_retries=0 where an error answer is expected (the SDK retries 429 and 5xx
by default; the test counts the attempts that reach the providers).
"""

import sys

import openai
from openai import OpenAI


def check(name, cond, detail=""):
    if not cond:
        raise AssertionError(f"{name}: {detail}")


def main(base):
    client = OpenAI(base_url=f"{base}/v1", api_key="sk-test", timeout=30)
    strict = client.with_options(max_retries=0)
    messages = [{"role": "user", "content": "Say hello"}]

    # A plain call, seen through the raw response too: who served, compressed for the client.
    raw = client.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=messages)
    r = raw.parse()
    check("chat", r.choices[0].message.content.startswith("Hello from a"), r)
    check("chat usage", r.usage.total_tokens > 0, r.usage)
    check("chat provider", raw.headers.get("x-market-router-provider") == "a", raw.headers)
    check("chat gzip", raw.headers.get("content-encoding") == "gzip", raw.headers)
    check("chat cost", raw.headers.get("x-market-router-cost-usd") is not None, raw.headers)
    print("ok chat")

    # Streaming with the usage chunk at the end.
    stream = client.chat.completions.create(
        model="gpt-4o-mini",
        messages=messages,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, usage = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            usage = chunk.usage
    check("stream text", text.startswith("Hello from a"), text)
    check("stream usage", usage is not None and usage.completion_tokens > 0, usage)
    print("ok stream")

    e = client.embeddings.create(model="text-embedding-3-small", input="hello")
    check("embeddings", len(e.data[0].embedding) == 3, e)
    check("embeddings usage", e.usage.prompt_tokens > 0, e.usage)
    print("ok embeddings")

    # An answer bigger than Envoy's buffer.
    e = client.embeddings.create(model="big-embedding", input="hello")
    check("big embeddings", len(e.data[0].embedding) >= 200_000, len(e.data[0].embedding))
    print("ok big_embeddings")

    # The cheapest provider of this model fails; the client does not notice.
    raw = strict.chat.completions.with_raw_response.create(model="flaky-model", messages=messages)
    r = raw.parse()
    check("failover", r.choices[0].message.content.startswith("Hello from b"), r)
    check("failover attempts", raw.headers.get("x-market-router-attempts") == "2", raw.headers)
    print("ok failover")

    def expect(name, exc_type, status, code, call):
        try:
            call()
        except exc_type as err:
            check(name, err.status_code == status, f"status {err.status_code}: {err}")
            body = err.body if isinstance(err.body, dict) else {}
            got = body.get("code") or (body.get("error") or {}).get("code")
            check(name, got == code, f"code {got!r}: {err.body}")
            print(f"ok {name}")
            return err
        raise AssertionError(f"{name}: no {exc_type.__name__} raised")

    expect(
        "not_found",
        openai.NotFoundError,
        404,
        "model_not_found",
        lambda: strict.chat.completions.create(model="no-such-model", messages=messages),
    )
    expect(
        "bad_request",
        openai.BadRequestError,
        400,
        "model_missing",
        lambda: strict.chat.completions.create(model="", messages=messages),
    )
    expect(
        "too_large",
        openai.APIStatusError,
        413,
        "request_too_large",
        lambda: strict.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "x" * 20000}]
        ),
    )
    err = expect(
        "rate_limited",
        openai.RateLimitError,
        429,
        "all_providers_failed",
        lambda: strict.chat.completions.create(model="busy-model", messages=messages),
    )
    check("rate_limited retry-after", err.response.headers.get("retry-after") == "1", err.response.headers)
    expect(
        "unavailable",
        openai.InternalServerError,
        503,
        "all_providers_failed",
        lambda: strict.chat.completions.create(model="unavailable-model", messages=messages),
    )
    expect(
        "bad_gateway",
        openai.InternalServerError,
        502,
        "all_providers_failed",
        lambda: strict.chat.completions.create(model="down-model", messages=messages),
    )
    print(f"python openai {openai.__version__}: all checks passed")


if __name__ == "__main__":
    main(sys.argv[1])
