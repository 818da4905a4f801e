#!/usr/bin/env python3
"""higher's MAML few-shot Omniglot example (facebookresearch/higher, examples/maml-omniglot.py), ported to
metaopt.migrate, on synthetic N-way K-shot data of Omniglot's shapes (examples/omniglot_synthetic.py).
The original is Copyright (c) Facebook, Inc. and its affiliates, under the Apache License 2.0, itself
modified from Jackie Loong's MAML-Pytorch (https://github.com/dragen1860/MAML-Pytorch).

What changed against the original (docs/migration.md counts the lines): the import, the
``higher.innerloop_ctx(net, inner_opt, copy_initial_weights=False)`` line (metaopt's context always starts
at the module's own weights), ``track_higher_grads=False`` -> ``track=False``, the synthetic loader in place
of the download, and a few options for short runs (``--epochs``, ``--tasks``, ``--width``, ``--dtype``);
the plotting is left out. The model, the loops and the losses are the original's.

    python examples/maml_omniglot_higher.py --epochs 1 --tasks 2 --task_num 4
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torch.optim as optim
from torch import nn

from metaopt import migrate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from omniglot_synthetic import SyntheticNShot  # noqa: E402


def main(argv=None):
    argparser = argparse.ArgumentParser()
    argparser.add_argument('--n_way', type=int, help='n way', default=5)
    argparser.add_argument(
        '--k_spt', type=int, help='k shot for support set', default=5)
    argparser.add_argument(
        '--k_qry', type=int, help='k shot for query set', default=15)
    argparser.add_argument(
        '--task_num',
        type=int,
        help='meta batch size, namely task num',
        default=32)
    argparser.add_argument('--seed', type=int, help='random seed', default=1)
    argparser.add_argument('--epochs', type=int, help='epochs', default=100)
    argparser.add_argument('--tasks', type=int, help='meta-batches per epoch', default=100)
    argparser.add_argument('--width', type=int, help='conv channels', default=64)
    argparser.add_argument('--dtype', default='float32', choices=['float32', 'float64'])
    args = argparser.parse_args(argv)

    torch.manual_seed(args.seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(args.seed)
    np.random.seed(args.seed)

    # Set up the (synthetic) Omniglot loader.
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    dtype = getattr(torch, args.dtype)
    db = SyntheticNShot(
        batchsz=args.task_num,
        n_way=args.n_way,
        k_shot=args.k_spt,
        k_query=args.k_qry,
        imgsz=28,
        device=device,
        dtype=dtype,
        n_iter=args.tasks,
        seed=args.seed,
    )

    # A plain PyTorch network: metaopt.migrate runs it on fast weights, never patching it.
    w = args.width
    net = nn.Sequential(
        nn.Conv2d(1, w, 3),
        nn.BatchNorm2d(w, momentum=1, affine=True),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(w, w, 3),
        nn.BatchNorm2d(w, momentum=1, affine=True),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(w, w, 3),
        nn.BatchNorm2d(w, momentum=1, affine=True),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(2, 2),
        Flatten(),
        nn.Linear(w, args.n_way)).to(device, dtype)

    # Adam meta-optimizes the initial weights that the inner loop adapts.
    meta_opt = optim.Adam(net.parameters(), lr=1e-3)

    log = []
    for epoch in range(args.epochs):
        train(db, net, device, meta_opt, epoch, log)
        test(db, net, device, epoch, log)
    return net, log


def train(db, net, device, meta_opt, epoch, log):
    net.train()
    n_train_iter = db.n_train_iter

    for batch_idx in range(n_train_iter):
        start_time = time.time()
        # A meta-batch of support and query sets.
        x_spt, y_spt, x_qry, y_qry = db.next()

        task_num, setsz, c_, h, w = x_spt.size()
        querysz = x_qry.size(1)

        # The inner optimizer that adapts the weights to each support set.
        n_inner_iter = 5
        inner_opt = torch.optim.SGD(net.parameters(), lr=1e-1)

        qry_losses = []
        qry_accs = []
        meta_opt.zero_grad()
        for i in range(task_num):
            with migrate.innerloop(net, inner_opt) as (fnet, diffopt):
                # Adapt to the support set: each step keeps its graph.
                for _ in range(n_inner_iter):
                    spt_logits = fnet(x_spt[i])
                    spt_loss = F.cross_entropy(spt_logits, y_spt[i])
                    diffopt.step(spt_loss)

                # The adapted weights' query loss and accuracy.
                qry_logits = fnet(x_qry[i])
                qry_loss = F.cross_entropy(qry_logits, y_qry[i])
                qry_losses.append(qry_loss.detach())
                qry_acc = (qry_logits.argmax(
                    dim=1) == y_qry[i]).sum().item() / querysz
                qry_accs.append(qry_acc)

                # Back through the inner steps into net's .grad (the initial weights).
                qry_loss.backward()

        meta_opt.step()
        qry_losses = sum(qry_losses) / task_num
        qry_accs = 100. * sum(qry_accs) / task_num
        i = epoch + float(batch_idx) / n_train_iter
        iter_time = time.time() - start_time
        if batch_idx % 4 == 0:
            print(
                f'[Epoch {i:.2f}] Train Loss: {qry_losses:.2f} | Acc: {qry_accs:.2f} | Time: {iter_time:.2f}'
            )

        log.append({
            'epoch': i,
            'loss': qry_losses,
            'acc': qry_accs,
            'mode': 'train',
            'time': time.time(),
        })


def test(db, net, device, epoch, log):
    # No fine-tuning at test time beyond the inner steps (as in the original).
    net.train()
    n_test_iter = db.n_test_iter

    qry_losses = []
    qry_accs = []

    for batch_idx in range(n_test_iter):  # noqa: B007
        x_spt, y_spt, x_qry, y_qry = db.next('test')

        task_num, setsz, c_, h, w = x_spt.size()
        querysz = x_qry.size(1)  # noqa: F841

        n_inner_iter = 5
        inner_opt = torch.optim.SGD(net.parameters(), lr=1e-1)

        for i in range(task_num):
            with migrate.innerloop(net, inner_opt, track=False) as (fnet, diffopt):
                for _ in range(n_inner_iter):
                    spt_logits = fnet(x_spt[i])
                    spt_loss = F.cross_entropy(spt_logits, y_spt[i])
                    diffopt.step(spt_loss)

                qry_logits = fnet(x_qry[i]).detach()
                qry_loss = F.cross_entropy(
                    qry_logits, y_qry[i], reduction='none')
                qry_losses.append(qry_loss.detach())
                qry_accs.append(
                    (qry_logits.argmax(dim=1) == y_qry[i]).detach())

    qry_losses = torch.cat(qry_losses).mean().item()
    qry_accs = 100. * torch.cat(qry_accs).float().mean().item()
    print(
        f'[Epoch {epoch+1:.2f}] Test Loss: {qry_losses:.2f} | Acc: {qry_accs:.2f}'
    )
    log.append({
        'epoch': epoch + 1,
        'loss': qry_losses,
        'acc': qry_accs,
        'mode': 'test',
        'time': time.time(),
    })


class Flatten(nn.Module):
    def forward(self, input):
        return input.view(input.size(0), -1)


if __name__ == '__main__':
    main()
