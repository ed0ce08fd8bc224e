// Times, with the official E2B SDK, Sandbox.create() to the first
// commands.run() completed, N times (argument 1, default 20), killing each
// sandbox afterwards outside the timed span. Prints one JSON object with
// every sample and p50/p99 in milliseconds. TEMPLATE names the pool.
import { Sandbox } from 'e2b'

const n = Number(process.argv[2] || 20)
const template = process.env.TEMPLATE || 'base'
const samples = []
// One untimed round warms the SDK's connections and the JIT.
{
  const s = await Sandbox.create(template)
  await s.commands.run('true')
  await s.kill()
}
for (let i = 0; i < n; i++) {
  const t0 = performance.now()
  const s = await Sandbox.create(template)
  const r = await s.commands.run('true')
  const t1 = performance.now()
  if (r.exitCode !== 0) throw new Error(`exit code ${r.exitCode}`)
  samples.push(t1 - t0)
  await s.kill()
  // Let the pool refill before the next sample, so every one is a hit.
  if (process.env.PAUSE_MS) await new Promise((r) => setTimeout(r, Number(process.env.PAUSE_MS)))
}
const sorted = [...samples].sort((a, b) => a - b)
const q = (p) => sorted[Math.min(sorted.length - 1, Math.ceil(p * sorted.length) - 1)]
console.log(JSON.stringify({ n, p50_ms: +q(0.5).toFixed(1), p99_ms: +q(0.99).toFixed(1), samples_ms: samples.map((x) => +x.toFixed(1)) }))
