"""What the Pallas kernels compile to on sm_90, without a GPU: registers, spills, shared
memory, and the instructions that matter (wgmma, async copies, local-memory traffic).

jax lowers a Pallas Triton kernel to Triton IR (TTIR) on any machine; the ``triton``
package then compiles that IR for an sm_90 target with its own ptxas, and its cuobjdump
reads the result. jax and triton need not share a Python: the /work venv has no triton.

    python bench/triton_check.py --dump /tmp/ttir                 # jax: write the TTIR
    /path/to/python-with-triton bench/triton_check.py --compile /tmp/ttir
    python3 bench/triton_check.py --dump /tmp/ttir --compile /tmp/ttir   # both (H200 image)

The Triton that compiles here (pip, e.g. 3.5) is not the one XLA bundles, so the report
is a lead, not the binary that will run: check it against the GPU's timings.
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import re
import subprocess

# (name, kernel, tokens, (K, N), config, prepare kwargs, call kwargs)
VARIANTS = [
    ("decode_t1_64-2-8", "decode", 1, (4096, 4096), "64:2:8", {}, {}),
    ("decode_t16_64-2-8", "decode", 16, (4096, 4096), "64:2:8", {}, {}),
    ("decode_t64_64-2-8", "decode", 64, (4096, 4096), "64:2:8", {}, {}),
    ("decode_t16_64-2-5_k11008", "decode", 16, (11008, 4096), "64:2:5", {}, {}),
    ("prefill_bt256_128-2-8", "prefill", 4096, (4096, 4096), "128:2:8", {}, {}),
    ("prefill_bt128_128-2-8_w8", "prefill", 4096, (4096, 4096), "128:2:8", {},
     dict(block_tokens=128, num_warps=8)),
    ("prefill_bt256_64-2-8", "prefill", 4096, (4096, 4096), "64:2:8", {}, {}),
    ("prefill_bt256_64-2-5", "prefill", 4096, (4096, 4096), "64:2:5", {}, {}),
]
INSTRUCTIONS = ("HGMMA", "HMMA", "LDGSTS", "LDG", "LDSM", "LDS", "STG", "LDL", "STL")


def dump(directory: str) -> None:
  """Lowers every variant for CUDA and writes <name>.ttir and <name>.json into directory."""
  import jax
  import jax.numpy as jnp
  from jax._src.pallas.triton import lowering, pallas_call_registration

  from vnm_jax.config import VNMConfig
  from vnm_jax.ops.vnm_matmul import pallas_decode, pallas_prefill

  captured = []
  original = lowering.lower_jaxpr_to_triton_module

  def capture(*args, **kwargs):
    result = original(*args, **kwargs)
    captured.append(result.module.operation.get_asm(enable_debug_info=False))
    return result

  pallas_call_registration.lowering.lower_jaxpr_to_triton_module = capture
  os.makedirs(directory, exist_ok=True)
  for name, kernel, tokens, (k, n), config, prep, call in VARIANTS:
    module = {"decode": pallas_decode, "prefill": pallas_prefill}[kernel]
    cfg = VNMConfig.parse(config)
    g, r = -(-k // cfg.m), -(-n // cfg.v)
    stored = (jax.ShapeDtypeStruct((r, 2, g, cfg.v), jnp.bfloat16),
              jax.ShapeDtypeStruct((r, g, cfg.v // 2), jnp.uint8),
              jax.ShapeDtypeStruct((r, 4, g), jnp.int32))
    layout = jax.eval_shape(functools.partial(module.prepare, m=cfg.m, **prep), *stored)
    x = jax.ShapeDtypeStruct((tokens, k), jnp.bfloat16)
    captured.clear()
    fn = functools.partial(module.matmul, m=cfg.m, **call)
    jax.jit(fn).trace(x, layout).lower(lowering_platforms=("cuda",))
    (ttir,) = captured
    # The options the kernel passes to Triton (its defaults included), read off the call.
    jaxpr = jax.make_jaxpr(fn)(x, layout)
    params = _pallas_params(jaxpr.jaxpr)
    with open(os.path.join(directory, f"{name}.ttir"), "w") as f:
      f.write(ttir)
    with open(os.path.join(directory, f"{name}.json"), "w") as f:
      json.dump(dict(name=name, kernel=kernel, tokens=tokens, shape=[k, n], config=config,
                     layout=[list(a.shape) for a in layout], **params), f)
    print(f"dumped {name}: {params}", flush=True)


def _pallas_params(jaxpr) -> dict:
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "pallas_call":
      p = eqn.params["compiler_params"]
      return dict(num_warps=p.num_warps or 4, num_stages=p.num_stages or 3)
    for sub in eqn.params.values():
      inner = getattr(sub, "jaxpr", None)
      if inner is not None:
        found = _pallas_params(inner)
        if found:
          return found
  return {}


def compile_all(directory: str) -> None:
  """Compiles every <name>.ttir in directory for sm_90 and prints a resource table."""
  import triton
  from triton.backends.compiler import GPUTarget

  tools = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
  rows = []
  for path in sorted(glob.glob(os.path.join(directory, "*.ttir"))):
    with open(path.replace(".ttir", ".json")) as f:
      info = json.load(f)
    options = dict(num_warps=info["num_warps"], num_stages=info["num_stages"])
    try:
      compiled = triton.compile(path, target=GPUTarget("cuda", 90, 32), options=options)
    except Exception as error:  # report and go on: one variant's failure is a finding
      rows.append(f"| {info['name']} | failed: {type(error).__name__}: {str(error)[:120]} |")
      continue
    cubin = path.replace(".ttir", ".cubin")
    with open(cubin, "wb") as f:
      f.write(compiled.asm["cubin"])
    usage = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-resource-usage", cubin],
                           capture_output=True, text=True).stdout
    sass = subprocess.run([os.path.join(tools, "cuobjdump"), "--dump-sass", cubin],
                          capture_output=True, text=True).stdout
    with open(path.replace(".ttir", ".sass"), "w") as f:
      f.write(sass)
    regs = re.search(r"REG:(\d+)", usage)
    stack = re.search(r"STACK:(\d+)", usage)
    opcodes = re.findall(r"\b([A-Z][A-Z0-9]+)(?:\.[A-Z0-9x_.]+)?\s", sass)
    counts = {op: sum(1 for o in opcodes if o == op) for op in INSTRUCTIONS}
    mma = sorted(set(re.findall(r"(HGMMA\.\S+|HMMA\.\S+)", sass)))
    rows.append(f"| {info['name']} | {options['num_warps']} | {options['num_stages']} | "
                f"{regs.group(1) if regs else '?'} | {stack.group(1) if stack else '?'} | "
                f"{compiled.metadata.shared} | "
                + " ".join(f"{op}:{c}" for op, c in counts.items() if c) + f" | {' '.join(mma)} |")
  print("| variant | warps | stages | registers | stack (spill) bytes | shared bytes | "
        "instructions (static counts) | MMA |")
  print("|---|---|---|---|---|---|---|---|")
  print("\n".join(rows))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--dump", metavar="DIR", help="write the kernels' TTIR here (needs jax)")
  parser.add_argument("--compile", metavar="DIR",
                      help="compile DIR/*.ttir for sm_90 (needs the triton package)")
  args = parser.parse_args(argv)
  if not args.dump and not args.compile:
    parser.error("give --dump DIR, --compile DIR or both")
  if args.dump:
    dump(args.dump)
  if args.compile:
    compile_all(args.compile)


if __name__ == "__main__":
  main()
