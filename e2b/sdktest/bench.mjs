// Times, with the official E2B SDK, Sandbox.create() to the first
// commands.run() completed, N times (argument 1, default 20), killing each
// sandbox afterwards outside the timed span. Prints one JSON object with
// every sample and p50/p99 in milliseconds. TEMPLATE names the pool.
import { Sandbox } from 'e2b'

const n = Number(process.argv[2] || 20)
const template = process.env.TEMPLATE || 'base'
const samples = []
const creates = []
const runs = []
// One untimed round warms the SDK's connections and the JIT.
{
  const s = await Sandbox.create(template)
  await s.commands.run('true')
  await s.kill()
}
for (let i = 0; i < n; i++) {
  const t0 = performance.now()
  const s = await Sandbox.create(template)
  const tc = performance.now()
  const r = await s.commands.run('true')
  const t1 = performance.now()
  if (r.exitCode !== 0) throw new Error(`exit code ${r.exitCode}`)
  samples.push(t1 - t0)
  creates.push(tc - t0)
  runs.push(t1 - tc)
  await s.kill()
  // Let the pool refill before the next sample, so every one is a hit.
  if (process.env.PAUSE_MS) await new Promise((r) => setTimeout(r, Number(process.env.PAUSE_MS)))
}
const q = (xs, p) => {
  const sorted = [...xs].sort((a, b) => a - b)
  return +sorted[Math.min(sorted.length - 1, Math.ceil(p * sorted.length) - 1)].toFixed(1)
}
const ms = (xs) => xs.map((x) => +x.toFixed(1))
console.log(JSON.stringify({
  n, p50_ms: q(samples, 0.5), p99_ms: q(samples, 0.99),
  create_p50_ms: q(creates, 0.5), run_p50_ms: q(runs, 0.5),
  samples_ms: ms(samples), create_ms: ms(creates), run_ms: ms(runs),
}))
