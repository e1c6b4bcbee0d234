/**
 * Runs one task of a llama-mesh deployment over gRPC and streams its events.
 *
 *   npx tsx examples/run_task.ts [--service ID] [--message TEXT | --input JSON] ADDRESS DEPLOYMENT
 *
 * ADDRESS is the gateway's (or the API server's) gRPC address, host:port. The task is created
 * with ApiServer.CreateTask; its events are streamed with ApiServer.StreamEvents and printed one
 * JSON object a line ({"index", "kind", "type", "data"}); the last line is the task's result
 * ({"result": ...}). A failed or cancelled task, or any RPC error, exits with status 1.
 * LLAMA_MESH_API_KEY, when set, is sent as a bearer token.
 */
import { parseArgs } from "node:util";

import type { JsonObject } from "@bufbuild/protobuf";
import { createClient, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { ApiServer } from "../src/gen/llama_mesh/v1/apiserver_pb.js";
import { EventKind, EventKindSchema } from "../src/gen/llama_mesh/v1/types_pb.js";

const USAGE = "usage: run_task.ts [--service ID] [--message TEXT | --input JSON] ADDRESS DEPLOYMENT";

async function main(): Promise<void> {
  const { values, positionals } = parseArgs({
    allowPositionals: true,
    options: {
      service: { type: "string", default: "" },
      message: { type: "string", default: "Hello from TypeScript" },
      input: { type: "string" },
    },
  });
  if (positionals.length !== 2) {
    throw new UsageError(USAGE);
  }
  const [address, deployment] = positionals as [string, string];
  const input = taskInput(values.message, values.input);

  const apiKey = process.env.LLAMA_MESH_API_KEY;
  const bearer: Interceptor = (next) => async (req) => {
    if (apiKey) req.header.set("authorization", `Bearer ${apiKey}`);
    return next(req);
  };
  const transport = createGrpcTransport({
    baseUrl: address.includes("://") ? address : `http://${address}`,
    interceptors: [bearer],
  });
  const client = createClient(ApiServer, transport);

  const { task } = await client.createTask({ deployment, serviceId: values.service, input });
  if (!task) throw new Error("CreateTask returned no task");
  console.error(`task ${task.taskId} on service ${task.serviceId}`);

  for await (const { event } of client.streamEvents({ deployment, taskId: task.taskId })) {
    if (!event) continue;
    const data: JsonObject = event.data ?? {};
    const kind = EventKindSchema.value[event.kind]?.name ?? String(event.kind);
    console.log(JSON.stringify({ index: Number(event.index), kind, type: event.type, data }));
    switch (event.kind) {
      case EventKind.RESULT:
        console.log(JSON.stringify({ result: data.result ?? null }));
        return;
      case EventKind.FAILED:
        throw new Error(`task failed: ${String(data.error_type)}: ${String(data.error)}`);
      case EventKind.CANCELLED:
        throw new Error(`task cancelled: ${String(data.reason)}`);
    }
  }
  throw new Error("the event stream ended without a final event");
}

/** The keyword arguments of Workflow.run: `--input` as a JSON object, else `{message}`. */
function taskInput(message: string, inputJson: string | undefined): JsonObject {
  if (inputJson === undefined) return { message };
  let parsed: unknown;
  try {
    parsed = JSON.parse(inputJson);
  } catch {
    parsed = undefined;
  }
  if (parsed === undefined || parsed === null || typeof parsed !== "object" || Array.isArray(parsed)) {
    throw new UsageError(`--input must be a JSON object: ${inputJson}`);
  }
  return parsed as JsonObject;
}

class UsageError extends Error {}

main().catch((err: unknown) => {
  console.error(`run_task: ${err instanceof Error ? err.message : String(err)}`);
  process.exitCode = err instanceof UsageError ? 2 : 1;
});
