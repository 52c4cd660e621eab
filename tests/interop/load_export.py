"""Run inside an interop environment (its own transformers / compressed-tensors): load an export the way a user
would, with ``AutoModelForCausalLM.from_pretrained``, and compare its logits with podar's.

    python load_export.py EXPORT_DIR REFERENCE.safetensors [--gguf FILE]

REFERENCE holds ``input_ids`` (B, T) int64 and ``logits`` (B, T, V) float32 computed by podar. Prints one JSON
line: outcome ``equal`` (max |Δlogit| <= 1e-3 · max |logit|), ``wrong`` (it loaded, and computes something else)
or ``refused`` (loading or the forward raised), with the versions and the error. Needs only torch, transformers
and safetensors: it imports nothing from podar.
"""

from __future__ import annotations

import argparse
import json
import warnings


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("export")
    parser.add_argument("reference")
    parser.add_argument("--gguf", default=None, help="the GGUF file name inside EXPORT (transformers' GGUF loader)")
    parser.add_argument("--encoder", action="store_true", help="AutoModel; 'logits' are the last hidden states")
    args = parser.parse_args()

    import torch
    import transformers
    from safetensors.torch import load_file

    try:
        import compressed_tensors

        ct_version = compressed_tensors.__version__
    except ImportError:
        ct_version = None
    ref = load_file(args.reference)
    out = {"transformers": transformers.__version__, "compressed_tensors": ct_version}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kwargs = {"gguf_file": args.gguf} if args.gguf else {}
            auto = transformers.AutoModel if args.encoder else transformers.AutoModelForCausalLM
            model = auto.from_pretrained(args.export, dtype=torch.float32, **kwargs)
            with torch.no_grad():
                out_ = model(input_ids=ref["input_ids"])
                logits = (out_.last_hidden_state if args.encoder else out_.logits).float()
        out["warnings"] = [str(w.message)[:200] for w in caught][:5]
    except Exception as e:  # a refusal is a correct outcome for a format the loader does not know
        out.update(outcome="refused", error=f"{type(e).__name__}: {str(e)[:400]}")
        print(json.dumps(out))
        return
    scale = max(float(ref["logits"].abs().max()), 1.0)
    diff = float((logits - ref["logits"]).abs().max()) if logits.shape == ref["logits"].shape else float("inf")
    out.update(outcome="equal" if diff <= 1e-3 * scale else "wrong", max_abs_diff=diff, scale=scale)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
