// Reference runtime for the TF.js parity tests: pure-JS TensorFlow.js (CPU backend) and face-api's own networks.
//
// Usage: node tests/tfjs_reference.cjs JOB.json, where JOB is one of
//   {"kind": "graph", "model": "model.json", "inputs": {"name": "x.npy"}, "outputs": {"name": "y.npy"}}
//       tf.loadGraphModel on model.json (its shards beside it), execute, write the named outputs (with
//       "per_sample": true, one batch element at a time, for graphs that bake batch size 1 into reshapes);
//   {"kind": "faceapi", "net": "FaceRecognitionNet", "manifest": "x-weights_manifest.json", "input": "x.npy",
//    "output": "y.npy"}  face-api's loadFromDisk, then forwardInput on an NHWC batch (pixel values 0-255);
//   {"kind": "weights", "manifest": "x.json", "output": "dir"}
//       tf.io.decodeWeights on a manifest (or a model.json's weightsManifest): each weight as dir/<index>.npy and
//       dir/names.json.
// A graph or faceapi job with "timings": "t.json" and "repeat": N then runs N more times and writes each run's wall
// and CPU milliseconds there (bench/targets.py); "backend": "wasm" runs on the WebAssembly backend ("cpu", pure JS,
// by default). Tensors travel as little-endian float32 .npy files. Packages come from NODE_PATH (the Makefile
// installs them).

const fs = require('fs');
const path = require('path');

function readNpy(file) {
  const buffer = fs.readFileSync(file);
  const headerLength = buffer.readUInt16LE(8);
  const header = buffer.toString('latin1', 10, 10 + headerLength);
  if (!header.includes("'descr': '<f4'") || header.includes("'fortran_order': True")) {
    throw new Error(`${file}: expected a C-ordered little-endian float32 array`);
  }
  const shape = header.match(/'shape': \(([^)]*)\)/)[1].split(',').filter((s) => s.trim()).map(Number);
  const start = 10 + headerLength;
  const values = new Float32Array(buffer.buffer.slice(buffer.byteOffset + start, buffer.byteOffset + buffer.length));
  return { shape, values };
}

function writeNpy(file, shape, values) {
  const dims = shape.length === 1 ? `${shape[0]},` : shape.join(', ');
  let header = `{'descr': '<f4', 'fortran_order': False, 'shape': (${dims}), }`;
  header += ' '.repeat(63 - ((10 + header.length) % 64)) + '\n'; // total header size a multiple of 64
  const prefix = Buffer.alloc(10);
  prefix.write('\x93NUMPY', 0, 'latin1');
  prefix.writeUInt8(1, 6);
  prefix.writeUInt8(0, 7);
  prefix.writeUInt16LE(header.length, 8);
  const data = Buffer.from(Float32Array.from(values).buffer);
  fs.writeFileSync(file, Buffer.concat([prefix, Buffer.from(header, 'latin1'), data]));
}

function readWeights(manifest, folder) {
  const specs = [];
  const buffers = [];
  for (const group of manifest) {
    specs.push(...group.weights);
    for (const shard of group.paths) {
      const data = fs.readFileSync(path.join(folder, path.basename(shard)));
      buffers.push(data.buffer.slice(data.byteOffset, data.byteOffset + data.length));
    }
  }
  return { specs, buffers };
}

async function graph(tf, job) {
  const model = JSON.parse(fs.readFileSync(job.model, 'utf8'));
  const { specs, buffers } = readWeights(model.weightsManifest, path.dirname(job.model));
  const artifacts = { ...model, weightSpecs: specs, weightData: buffers };
  const net = await tf.loadGraphModel(tf.io.fromMemory(artifacts));
  const inputs = Object.entries(job.inputs).map(([name, file]) => {
    const { shape, values } = readNpy(file);
    return [name, tf.tensor(values, shape, 'float32')];
  });
  const names = Object.keys(job.outputs);
  const run = (feeds) => [net.execute(feeds, names)].flat();
  // Graphs that bake batch size 1 into their reshapes run one sample at a time ("per_sample": true).
  const batch = inputs[0][1].shape[0];
  const parts = job.per_sample
    ? [...Array(batch).keys()].map((i) => run(Object.fromEntries(inputs.map(([n, t]) => [n, t.slice(i, 1)]))))
    : [run(Object.fromEntries(inputs))];
  names.forEach((name, k) => {
    const result = tf.concat(parts.map((outputs) => outputs[k]), 0);
    writeNpy(job.outputs[name], result.shape, result.dataSync());
  });
  time(tf, job, () => (job.per_sample
    ? [...Array(batch).keys()].map((i) => run(Object.fromEntries(inputs.map(([n, t]) => [n, t.slice(i, 1)]))))
    : [run(Object.fromEntries(inputs))]).flat());
}

// With job.timings: `repeat` more runs of compute(), each timed to its outputs' values (wall and CPU ms).
function time(tf, job, compute) {
  if (!job.timings) return;
  const wall = [];
  const cpu = [];
  for (let i = 0; i < (job.repeat || 5); i += 1) {
    const started = process.hrtime.bigint();
    const usage = process.cpuUsage();
    tf.tidy(() => compute().forEach((t) => t.dataSync()));
    const used = process.cpuUsage(usage);
    wall.push(Number(process.hrtime.bigint() - started) / 1e6);
    cpu.push((used.user + used.system) / 1e3);
  }
  fs.writeFileSync(job.timings, JSON.stringify({ wall, cpu, backend: tf.getBackend() }));
}

async function faceapi(tf, job) {
  const api = require('@vladmandic/face-api/dist/face-api.node-wasm.js');
  const net = new api[job.net]();
  await net.loadFromDisk(job.manifest);
  const { shape, values } = readNpy(job.input);
  const input = await api.toNetInput(tf.unstack(tf.tensor(values, shape, 'float32'))); // one 3D tensor per face
  const output = net.forwardInput(input, ...(job.args || []));
  writeNpy(job.output, output.shape, output.dataSync());
  time(tf, job, () => [net.forwardInput(input, ...(job.args || []))]);
}

async function weights(tf, job) {
  const manifest = JSON.parse(fs.readFileSync(job.manifest, 'utf8'));
  const { specs, buffers } = readWeights(manifest.weightsManifest || manifest, path.dirname(job.manifest));
  const decoded = tf.io.decodeWeights(buffers, specs);
  fs.mkdirSync(job.output, { recursive: true });
  specs.forEach((spec, i) => {
    const tensor = decoded[spec.name];
    writeNpy(path.join(job.output, `${i}.npy`), tensor.shape, tensor.dataSync());
  });
  fs.writeFileSync(path.join(job.output, 'names.json'), JSON.stringify(specs.map((s) => s.name)));
}

async function main() {
  const job = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const tf = job.kind === 'faceapi' ? require('@vladmandic/face-api/dist/face-api.node-wasm.js').tf : require('@tensorflow/tfjs');
  if (job.backend === 'wasm' && job.kind !== 'faceapi') require('@tensorflow/tfjs-backend-wasm');
  await tf.setBackend(job.backend || 'cpu');
  await tf.ready();
  await { graph, faceapi, weights }[job.kind](tf, job);
}

main().catch((error) => {
  console.error(error.stack || String(error));
  process.exit(1);
});
