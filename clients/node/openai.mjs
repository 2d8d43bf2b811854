#!/usr/bin/env node
// The official `openai` Node.js package, pointed at Switchboard's OpenAI-compatible API on
// Envoy's public port (`http://HOST:PORT/v1`), with a Switchboard API key as its key.
//
// It lists the models, asks for a chat completion, streams one (with the usage chunk),
// embeds two texts and asks for a model that does not exist. Each result is printed to
// stdout as one JSON line (`kind` and its fields); a call that fails where it should not
// prints an `api_error` line (HTTP status, the error's `code`, which is Switchboard's
// ErrorInfo reason, and message) and exits with status 1.
//
//   node clients/node/openai.mjs --base-url http://localhost:8080/v1 --api-key "$KEY"

import { parseArgs } from "node:util";

import OpenAI from "openai";

const USAGE = `usage: openai.mjs [options]

  --base-url URL   the API's base URL ($OPENAI_BASE_URL, default http://localhost:8080/v1)
  --api-key KEY    a Switchboard API key ($SWITCHBOARD_API_KEY; the key decides the tenant)
  --model NAME     model of the completions: a model, a tier (small, large) or auto (default)
`;

const CONTEXT =
  "Envoy is an edge proxy. It routes gRPC calls by service name. Triton batches requests.";
const QUESTION = "What does Envoy route?";

function options() {
  const { values } = parseArgs({
    options: {
      "base-url": {
        type: "string",
        default: process.env.OPENAI_BASE_URL || "http://localhost:8080/v1",
      },
      "api-key": { type: "string", default: process.env.SWITCHBOARD_API_KEY || "" },
      model: { type: "string", default: "auto" },
      help: { type: "boolean", default: false },
    },
  });
  if (values.help) {
    process.stdout.write(USAGE);
    process.exit(0);
  }
  return values;
}

function print(line) {
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

function apiError(error) {
  return {
    kind: "api_error",
    status: error.status ?? null,
    code: error.code ?? error.error?.code ?? null,
    type: error.type ?? null,
    message: error.message,
  };
}

async function main() {
  const args = options();
  const client = new OpenAI({ baseURL: args["base-url"], apiKey: args["api-key"], maxRetries: 0 });
  const messages = [
    { role: "system", content: CONTEXT },
    { role: "user", content: QUESTION },
  ];

  const models = await client.models.list();
  print({ kind: "models", ids: models.data.map((m) => m.id) });

  const completion = await client.chat.completions.create({ model: args.model, messages });
  print({
    kind: "completion",
    id: completion.id,
    model: completion.model,
    text: completion.choices[0].message.content,
    finish_reason: completion.choices[0].finish_reason,
    usage: completion.usage,
    switchboard: completion.switchboard,
  });

  const stream = await client.chat.completions.create({
    model: args.model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
  });
  const pieces = [];
  let finish = null;
  let usage = null;
  let served = null;
  for await (const chunk of stream) {
    for (const choice of chunk.choices) {
      if (choice.delta.content) pieces.push(choice.delta.content);
      if (choice.finish_reason) {
        finish = choice.finish_reason;
        served = chunk.switchboard;
      }
    }
    if (chunk.usage) usage = chunk.usage;
  }
  print({ kind: "stream", chunks: pieces.length, text: pieces.join(""), finish_reason: finish, usage, switchboard: served });

  const embeddings = await client.embeddings.create({ input: ["a cat", "a kitten"] });
  print({
    kind: "embeddings",
    model: embeddings.model,
    count: embeddings.data.length,
    dimensions: embeddings.data[0].embedding.length,
    usage: embeddings.usage,
  });

  try {
    await client.chat.completions.create({ model: "no-such-model", messages });
    print({ kind: "unexpected_success" });
  } catch (error) {
    if (!(error instanceof OpenAI.APIError)) throw error;
    print({ ...apiError(error), kind: "expected_error" });
  }
}

main().catch((error) => {
  if (error instanceof OpenAI.APIError) {
    print(apiError(error));
    process.stderr.write(`API error ${error.status}: ${error.message}\n`);
  } else {
    process.stderr.write(`${error.stack || error}\n`);
  }
  process.exit(1);
});
