"""Train the small FP reference ViT on full Fashion-MNIST (60k train, top-1 on t10k).

No pretrained weights can be downloaded here, so the project ships its own FP model to quantize. The test split is
read once, after training, to report fp_top1; nothing is selected on it.

Example: python scripts/train_reference.py --arch-kwargs vit6 --epochs 4 --seed 0 --out checkpoints/vit6_fmnist.pth
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F

from evolq_pl.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD, read_idx, resize_images

_BASE = {"img_size": 28, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 96, "num_heads": 3}
_LEVIT = {"img_size": 96, "in_chans": 1, "num_classes": 10, "embed_dim": (64, 96, 128), "key_dim": 16,
          "num_heads": (2, 3, 4), "depth": (2, 2, 2)}
# Swin-T's layout shrunk to 32 px: 8x8 patches of 4 px, windows of 4 (so stage 1 shifts with a mask), one patch merging
_SWIN = {"img_size": 32, "patch_size": 4, "in_chans": 1, "num_classes": 10, "embed_dim": 48, "depths": (2, 4),
         "num_heads": (3, 6), "window_size": 4}
# preset -> (timm architecture, kwargs, input side in pixels; Fashion-MNIST's 28 px are resized to it)
PRESETS: dict[str, tuple[str, dict, int]] = {
    "vit6": ("vit_tiny_patch16_224", {**_BASE, "depth": 6}, 28),
    "vit12": ("vit_tiny_patch16_224", {**_BASE, "depth": 12}, 28),
    # 12 blocks that train on two CPU cores in about half an hour: 16 patches of 7 px, width 64, 2 heads
    "vit12s": ("vit_tiny_patch16_224", {**_BASE, "depth": 12, "patch_size": 7, "embed_dim": 64, "num_heads": 2}, 28),
    "levit": ("levit_128s", _LEVIT, 96),
    "swin": ("swin_tiny_patch4_window7_224", _SWIN, 32),
    # ResNet-18's BasicBlock at one block per stage, widths 32-256, on the 28 px images (stem to 7x7, then 7/4/2/1)
    "resnet": ("resnet18", {"in_chans": 1, "num_classes": 10, "layers": (1, 1, 1, 1), "channels": (32, 64, 128, 256)},
               28),
}


def load_split(root: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Images as float [N,1,28,28] in [0,1] (normalized later, after padding with black) and int64 labels."""
    images = read_idx(root / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(root / f"{split}-labels-idx1-ubyte.gz")
    return torch.from_numpy(images).float().div_(255).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


def normalize(x: torch.Tensor, size: int = 28) -> torch.Tensor:
    """Resize (bilinear, as the data modules' ``image_size``) then normalize with Fashion-MNIST's statistics."""
    if x.shape[-1] != size:
        x = resize_images(x, size)
    return (x - FASHION_MNIST_MEAN) / FASHION_MNIST_STD


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 2) -> torch.Tensor:
    """Random crop after zero padding (black, the Fashion-MNIST background) and random horizontal flip."""
    n, _, h, w = x.shape
    dev = x.device  # random draws on the CPU generator (same stream on any device), gathers where x lives
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(dev)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen).to(dev)
    rows = (dy[:, None] + torch.arange(h, device=dev)[None, :])[:, None, :, None].expand(n, 1, h, w + 2 * pad)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w, device=dev)[None, :])[:, None, None, :].expand(n, 1, h, w)
    out = out.gather(3, cols)
    flip = (torch.rand(n, generator=gen) < 0.5).to(dev)
    out[flip] = out[flip].flip(-1)
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, size: int, batch: int = 500) -> float:
    model.eval()
    correct = 0
    device = next(model.parameters()).device
    for i in range(0, len(x), batch):
        xb = normalize(x[i : i + batch].to(device), size)
        correct += (model(xb).argmax(1).cpu() == y[i : i + batch]).sum().item()
    return 100.0 * correct / len(x)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on norms, biases, position embedding and class token (standard for ViTs)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("pos_embed", "cls_token") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch-kwargs", choices=sorted(PRESETS), default="vit6", help="model preset")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="output .pth file")
    parser.add_argument("--data-root", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument(
        "--limit-batches", type=int, default=0, help="stop each epoch after N batches (timing)"
    )
    args = parser.parse_args(argv)
    if args.epochs < 1:
        parser.error("--epochs must be >= 1")

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)  # with the same thread count the CPU run repeats bit for bit
    gen = torch.Generator().manual_seed(args.seed)

    x_train, y_train = load_split(args.data_root, "train")
    x_test, y_test = load_split(args.data_root, "t10k")
    timm_name, kwargs, size = PRESETS[args.arch_kwargs]
    device = torch.device(args.device)
    model = timm.create_model(timm_name, pretrained=False, **kwargs).to(device)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    if args.limit_batches:
        steps_per_epoch = min(steps_per_epoch, args.limit_batches)
    total = steps_per_epoch * args.epochs
    warmup = max(1, int(args.warmup_epochs * steps_per_epoch))

    def lr_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(x_train), generator=gen)
        loss_sum, correct, seen = 0.0, 0, 0
        for step in range(steps_per_epoch):
            idx = perm[step * args.batch_size : (step + 1) * args.batch_size]
            xb = normalize(augment(x_train[idx].to(device), gen), size)
            yb = y_train[idx].to(device)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(yb)
            correct += (logits.argmax(1) == yb).sum().item()
            seen += len(yb)
        print(
            f"epoch {epoch + 1}/{args.epochs}: train loss {loss_sum / seen:.4f} train top-1 "
            f"{100.0 * correct / seen:.2f}% ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    train_seconds = time.perf_counter() - start
    fp_top1 = evaluate(model, x_test, y_test, size)
    print(f"t10k top-1 {fp_top1:.2f}% after {train_seconds:.0f} s of training", flush=True)

    command = "python scripts/train_reference.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = {
        "timm_name": timm_name,
        "model_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()},
        "image_size": size,
        "seed": args.seed,
        "epochs": args.epochs,
        "fp_top1": fp_top1,
        "command": command,
        "input_mean": FASHION_MNIST_MEAN,
        "input_std": FASHION_MNIST_STD,
        "train_seconds": round(train_seconds, 1),
        "versions": {"torch": str(torch.__version__), "timm": str(timm.__version__)},
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    state = {k: v.detach().cpu().to(torch.float32).contiguous() if v.is_floating_point() else v.detach().cpu()
             for k, v in model.state_dict().items()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state, "meta": meta}, args.out)
    print(f"saved {args.out}", flush=True)


if __name__ == "__main__":
    main()
