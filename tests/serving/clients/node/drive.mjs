// The official Node `openai` package (node_modules, pinned in package-lock.json) against the
// server: the Node side of tests/serving/clients/drivers/_harness.py. Reads one job as JSON on
// stdin and prints one JSON object on its last line: for each interface, {text, parsed?} or
// {error: "Type: message"}.
import OpenAI, { toFile } from "openai";

const job = JSON.parse(await new Promise((resolve) => {
  let data = "";
  process.stdin.on("data", (chunk) => (data += chunk));
  process.stdin.on("end", () => resolve(data));
}));

const client = new OpenAI({ baseURL: job.base_url, apiKey: job.api_key, maxRetries: 0 });
const greedy = { temperature: 0, max_tokens: job.max_tokens };
const messages = [{ role: "user", content: [
  { type: "image_url", image_url: { url: job.photo } },
  { type: "text", text: job.question }] }];
const consult = [{ role: "user", content: [
  { type: "input_image", image_url: job.photo, detail: "auto" },
  { type: "input_text", text: job.question }] }];
const chatFormat = { type: "json_schema",
  json_schema: { name: job.schema_name, schema: job.schema, strict: true } };
const textFormat = { format: { type: "json_schema", name: job.schema_name, schema: job.schema,
  strict: true } };
const responseArgs = { model: job.model, input: consult, temperature: 0,
  max_output_tokens: job.max_tokens };

const chat = async (extra = {}) =>
  (await client.chat.completions.create({ model: job.model, messages, ...greedy, ...extra }))
    .choices[0].message.content;

async function batch() {
  const line = JSON.stringify({ custom_id: "consult-1", method: "POST", url: "/v1/chat/completions",
    body: { model: job.model, messages, ...greedy } }) + "\n";
  const upload = await client.files.create({
    file: await toFile(Buffer.from(line), "consults.jsonl"), purpose: "batch" });
  let batch = await client.batches.create({ input_file_id: upload.id,
    endpoint: "/v1/chat/completions", completion_window: "24h" });
  const deadline = Date.now() + 120000;
  while (!["completed", "failed", "cancelled", "expired"].includes(batch.status)) {
    if (Date.now() > deadline) throw new Error(`batch still ${batch.status}`);
    await new Promise((resolve) => setTimeout(resolve, 300));
    batch = await client.batches.retrieve(batch.id);
  }
  if (batch.status !== "completed") throw new Error(`batch ${batch.status}`);
  const record = JSON.parse(await (await client.files.content(batch.output_file_id)).text());
  await client.files.delete(upload.id);
  return { text: record.response.body.choices[0].message.content,
           status_code: record.response.status_code };
}

const cases = {
  chat: async () => ({ text: await chat() }),
  chat_stream: async () => {
    const stream = await client.chat.completions.create({ model: job.model, messages, ...greedy,
      stream: true });
    let text = "";
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
    return { text };
  },
  chat_structured: async () => {
    const text = await chat({ response_format: chatFormat });
    return { text, parsed: JSON.parse(text) };
  },
  responses: async () => ({ text: (await client.responses.create(responseArgs)).output_text }),
  responses_stream: async () => {
    const stream = await client.responses.create({ ...responseArgs, stream: true });
    let text = "";
    for await (const event of stream) {
      if (event.type === "response.output_text.delta") text += event.delta;
    }
    return { text };
  },
  responses_structured: async () => {
    const text = (await client.responses.create({ ...responseArgs, text: textFormat })).output_text;
    return { text, parsed: JSON.parse(text) };
  },
  batch,
};

const results = {};
for (const [name, run] of Object.entries(cases)) {
  try {
    results[name] = await run();
  } catch (err) {
    console.error(err);
    results[name] = { error: `${err.constructor.name}: ${err.message}` };
  }
}
console.log("\n" + JSON.stringify(results));
