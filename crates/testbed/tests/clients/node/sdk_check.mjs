// The official OpenAI Node SDK against market-router in a real Envoy.
//
// Run by tests/clients.rs, which starts the mock providers and Envoy and passes the base URL:
//
//     node sdk_check.mjs http://127.0.0.1:PORT
//
// Each check prints `ok <name>`; the first failure throws and ends the run non-zero. The SDK is
// used with its defaults, except maxRetries: 0 where an error answer is expected (it retries
// 429 and 5xx by default; the test counts the attempts that reach the providers).

import OpenAI from "openai";
import { readFileSync } from "node:fs";

const base = process.argv[2];
const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: "sk-test", timeout: 30000 });
const strict = client.withOptions({ maxRetries: 0 });
const messages = [{ role: "user", content: "Say hello" }];

function check(name, cond, detail) {
  if (!cond) throw new Error(`${name}: ${JSON.stringify(detail)}`);
}

{
  const { data: r, response } = await client.chat.completions
    .create({ model: "gpt-4o-mini", messages })
    .withResponse();
  check("chat", r.choices[0].message.content.startsWith("Hello from a"), r);
  check("chat usage", r.usage.total_tokens > 0, r.usage);
  check("chat provider", response.headers.get("x-market-router-provider") === "a", [...response.headers]);
  check("chat cost", response.headers.get("x-market-router-cost-usd") !== null, [...response.headers]);
  console.log("ok chat");
}

{
  const stream = await client.chat.completions.create({
    model: "gpt-4o-mini",
    messages,
    stream: true,
    stream_options: { include_usage: true },
  });
  let text = "";
  let usage = null;
  for await (const chunk of stream) {
    if (chunk.choices.length) text += chunk.choices[0].delta.content ?? "";
    if (chunk.usage) usage = chunk.usage;
  }
  check("stream text", text.startsWith("Hello from a"), text);
  check("stream usage", usage !== null && usage.completion_tokens > 0, usage);
  console.log("ok stream");
}

{
  const e = await client.embeddings.create({
    model: "text-embedding-3-small",
    input: "hello",
    encoding_format: "float",
  });
  check("embeddings", e.data[0].embedding.length === 3, e);
  console.log("ok embeddings");
  const big = await client.embeddings.create({
    model: "big-embedding",
    input: "hello",
    encoding_format: "float",
  });
  check("big embeddings", big.data[0].embedding.length >= 200000, big.data[0].embedding.length);
  console.log("ok big_embeddings");
}

{
  const { data: r, response } = await strict.chat.completions
    .create({ model: "flaky-model", messages })
    .withResponse();
  check("failover", r.choices[0].message.content.startsWith("Hello from b"), r);
  check("failover attempts", response.headers.get("x-market-router-attempts") === "2", [...response.headers]);
  console.log("ok failover");
}

async function expect(name, type, status, code, call) {
  try {
    await call();
  } catch (err) {
    check(`${name} type`, err instanceof type, `${err.constructor.name}: ${err.message}`);
    check(`${name} status`, err.status === status, err.status);
    const got = err.code ?? err.error?.code;
    check(`${name} code`, got === code, err.error);
    console.log(`ok ${name}`);
    return err;
  }
  throw new Error(`${name}: no ${type.name} thrown`);
}

await expect("not_found", OpenAI.NotFoundError, 404, "model_not_found", () =>
  strict.chat.completions.create({ model: "no-such-model", messages }),
);
await expect("bad_request", OpenAI.BadRequestError, 400, "model_missing", () =>
  strict.chat.completions.create({ model: "", messages }),
);
await expect("too_large", OpenAI.APIError, 413, "request_too_large", () =>
  strict.chat.completions.create({
    model: "gpt-4o-mini",
    messages: [{ role: "user", content: "x".repeat(20000) }],
  }),
);
const limited = await expect("rate_limited", OpenAI.RateLimitError, 429, "all_providers_failed", () =>
  strict.chat.completions.create({ model: "busy-model", messages }),
);
check("rate_limited retry-after", limited.headers.get("retry-after") === "1", [...limited.headers]);
await expect("unavailable", OpenAI.InternalServerError, 503, "all_providers_failed", () =>
  strict.chat.completions.create({ model: "unavailable-model", messages }),
);
await expect("bad_gateway", OpenAI.InternalServerError, 502, "all_providers_failed", () =>
  strict.chat.completions.create({ model: "down-model", messages }),
);

const version = JSON.parse(readFileSync(new URL("./node_modules/openai/package.json", import.meta.url))).version;
console.log(`node openai ${version}: all checks passed`);
