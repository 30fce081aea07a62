"""``broadface export``: ONNX export of trained backbones, and insightface weight import."""
from __future__ import annotations

import argparse
import time


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export a trained backbone (ONNX) or import insightface weights",
        description="Export a broadface checkpoint's backbone to ONNX (input 'data' N x 3 x S x S in [-1, 1], "
                    "output 'embedding' N x D, dynamic batch), checked against onnxruntime; or convert an "
                    "insightface arcface_torch iResNet backbone.pth into a broadface checkpoint.")
    sub = parser.add_subparsers(dest="export_command", metavar="FORMAT", required=True)

    onnx = sub.add_parser("onnx", help="checkpoint -> ONNX, with a PyTorch/onnxruntime parity check",
                          description="Export CHECKPOINT's backbone to OUT.onnx (BatchNorm folded by default) and "
                                      "print the max |difference| of L2-normalised embeddings vs onnxruntime.")
    onnx.add_argument("checkpoint", help="broadface checkpoint (.pt) or insightface iResNet backbone.pth")
    onnx.add_argument("output", help="ONNX file to write (atomically)")
    onnx.add_argument("--no-fold-bn", dest="fold_bn", action="store_false",
                      help="keep BatchNorm layers instead of folding them into convs/linears")
    onnx.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    onnx.add_argument("--input-size", type=int, default=None,
                      help="input side S (default: the checkpoint's model input_size; for an insightface "
                           "state dict the size it was trained at, default 112)")
    onnx.add_argument("--static-batch", action="store_true", help="fix the batch dimension to 1")
    onnx.add_argument("--dynamo", action="store_true", help="use the torch.export-based exporter (opset >= 18)")
    onnx.add_argument("--parity-n", type=int, default=8, help="random images for the parity check (0 skips it)")
    onnx.set_defaults(func=run_onnx)

    imp = sub.add_parser("from-insightface", help="insightface iResNet backbone.pth -> broadface checkpoint",
                         description="Read an insightface arcface_torch iResNet state dict (weights only, nothing "
                                     "unpickled), infer depth/embedding size, write a broadface checkpoint.")
    imp.add_argument("weights", help="insightface backbone .pth (a state dict)")
    imp.add_argument("output", help="broadface checkpoint to write")
    imp.add_argument("--input-size", type=int, default=112, help="input side the weights were trained at")
    imp.set_defaults(func=run_from_insightface)


def run_onnx(args: argparse.Namespace) -> int:
    from broadface.infer.export import check_onnx_parity, export_onnx
    from broadface.models import count_parameters
    from broadface.models.loader import input_size_of, load_model

    from broadface.fileio import check_output

    if args.parity_n < 0:
        raise ValueError(f"--parity-n must be >= 0, got {args.parity_n}")
    check_output(args.output, "output", inputs=(args.checkpoint,))
    loaded = load_model(args.checkpoint, input_size=args.input_size)  # insightface weights: the size they take
    if loaded.kind == "onnx":
        raise ValueError(f"{args.checkpoint} is already an ONNX model")
    model = loaded.net
    start = time.perf_counter()
    path = export_onnx(model, args.output, input_size=args.input_size, fold_bn=args.fold_bn, opset=args.opset,
                       dynamic_batch=not args.static_batch, dynamo=args.dynamo)
    size = args.input_size or input_size_of(model)
    print(f"wrote {path} ({model.config['name']}, {count_parameters(model) / 1e6:.2f}M params, "
          f"input {size}x{size}, opset {args.opset}, fold_bn={args.fold_bn}) in {time.perf_counter() - start:.1f}s")
    if args.parity_n:
        diff = check_onnx_parity(model, path, n=args.parity_n)
        print(f"parity: max |PyTorch - onnxruntime| of L2-normalised embeddings over {args.parity_n} images "
              f"= {diff:.2e}")
    return 0


def run_from_insightface(args: argparse.Namespace) -> int:
    from broadface.fileio import atomic_torch_save, check_output
    from broadface.models import count_parameters
    from broadface.models.insightface import load_insightface
    from broadface.models.checkpoint import FORMAT, VERSION

    check_output(args.output, "output", inputs=(args.weights,))
    model = load_insightface(args.weights, input_size=args.input_size)
    atomic_torch_save({"format": FORMAT, "version": VERSION, "model": model.config, "backbone": model.state_dict()},
                args.output)
    print(f"wrote {args.output}: {model.config} ({count_parameters(model) / 1e6:.2f}M params)")
    return 0
