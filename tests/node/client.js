#!/usr/bin/env node
// A Node.js client of the MaaS gateway, built from protos/ with @grpc/proto-loader at run time.
//
//   node tests/node/client.js HOST:PORT MODEL '[[1, 2, 3, 4]]'
//
// Calls ServerLive, ModelMetadata(MODEL) and ModelInfer with the rows as the model's first input
// (it must be FP32), sent little-endian in raw_input_contents. Prints one JSON object on stdout:
// {"live", "metadata": {name, versions, inputs, outputs}, "model_name", "model_version",
//  "outputs": {NAME: {datatype, shape, data}}}. On a gRPC error it prints the status code and
// message on stderr and exits with 1.
"use strict";

const path = require("node:path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");
const DEADLINE_MS = 30000;

function loadService() {
  const definition = protoLoader.loadSync(path.join(PROTOS, "inference", "grpc_service.proto"), {
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
    includeDirs: [PROTOS],
  });
  return grpc.loadPackageDefinition(definition).inference.GRPCInferenceService;
}

function call(client, method, request) {
  const deadline = new Date(Date.now() + DEADLINE_MS);
  return new Promise((resolve, reject) => {
    client[method](request, { deadline }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

function shapeOf(rows) {
  const shape = [];
  for (let level = rows; Array.isArray(level); level = level[0]) {
    shape.push(level.length);
  }
  return shape;
}

function encodeFp32(values) {
  const raw = Buffer.alloc(values.length * 4);
  values.forEach((value, i) => raw.writeFloatLE(value, i * 4));
  return raw;
}

function decode(tensor, raw) {
  const decoders = {
    FP32: [4, (buf, at) => buf.readFloatLE(at)],
    FP64: [8, (buf, at) => buf.readDoubleLE(at)],
    INT32: [4, (buf, at) => buf.readInt32LE(at)],
    INT64: [8, (buf, at) => Number(buf.readBigInt64LE(at))],
  };
  if (!(tensor.datatype in decoders)) {
    return raw.toString("base64");
  }
  const [size, read] = decoders[tensor.datatype];
  const values = [];
  for (let at = 0; at + size <= raw.length; at += size) {
    values.push(read(raw, at));
  }
  return values;
}

async function main(argv) {
  if (argv.length !== 3) {
    throw new Error("usage: node client.js HOST:PORT MODEL ROWS_JSON");
  }
  const [address, model, rowsJson] = argv;
  const rows = JSON.parse(rowsJson);
  const Service = loadService();
  const client = new Service(address, grpc.credentials.createInsecure());
  try {
    const live = await call(client, "ServerLive", {});
    const metadata = await call(client, "ModelMetadata", { name: model, version: "" });
    const input = metadata.inputs[0];
    if (input.datatype !== "FP32") {
      throw new Error(`model '${model}' input '${input.name}' is ${input.datatype}; this client sends FP32`);
    }
    const reply = await call(client, "ModelInfer", {
      model_name: model,
      inputs: [{ name: input.name, datatype: "FP32", shape: shapeOf(rows) }],
      raw_input_contents: [encodeFp32(rows.flat(Infinity))],
    });
    const outputs = {};
    reply.outputs.forEach((tensor, i) => {
      outputs[tensor.name] = {
        datatype: tensor.datatype,
        shape: tensor.shape,
        data: decode(tensor, reply.raw_output_contents[i]),
      };
    });
    const describe = (t) => ({ name: t.name, datatype: t.datatype, shape: t.shape });
    const result = {
      live: live.live,
      metadata: {
        name: metadata.name,
        versions: metadata.versions,
        inputs: metadata.inputs.map(describe),
        outputs: metadata.outputs.map(describe),
      },
      model_name: reply.model_name,
      model_version: reply.model_version,
      outputs,
    };
    process.stdout.write(`${JSON.stringify(result)}\n`);
  } finally {
    client.close();
  }
}

main(process.argv.slice(2)).catch((err) => {
  const status = err.code === undefined ? "" : `${grpc.status[err.code]}: `;
  process.stderr.write(`${status}${err.details || err.message}\n`);
  process.exit(1);
});
