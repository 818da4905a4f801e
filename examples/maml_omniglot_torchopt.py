#!/usr/bin/env python3
"""torchopt's MAML few-shot Omniglot example (metaopt/torchopt, examples/few-shot/maml_omniglot.py), ported to
metaopt.migrate, on synthetic N-way K-shot data of Omniglot's shapes (examples/omniglot_synthetic.py).
The original is Copyright 2022-2023 MetaOPT Team, under the Apache License 2.0, modified from higher's
example (Copyright (c) Facebook, Inc. and its affiliates, Apache License 2.0).

What changed against the original (docs/migration.md counts the lines): ``torchopt.MetaSGD(net, lr=...)``
becomes a plain ``torch.optim.SGD`` read by ``migrate.innerloop``; the inner loop runs on ``fnet`` inside
the context instead of on ``net`` itself, so the ``extract_state_dict`` / ``recover_state_dict`` pairs
that undo torchopt's in-place updates go (the module is never modified); the synthetic loader replaces the
download, with options for short runs (``--epochs``, ``--tasks``, ``--width``, ``--dtype``); no plotting.

    python examples/maml_omniglot_torchopt.py --epochs 1 --tasks 2 --task_num 4
"""

import argparse
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.optim as optim

from metaopt import migrate

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from omniglot_synthetic import SyntheticNShot  # noqa: E402


def main(argv=None):
    argparser = argparse.ArgumentParser()
    argparser.add_argument('--n_way', type=int, help='n way', default=5)
    argparser.add_argument('--k_spt', type=int, help='k shot for support set', default=5)
    argparser.add_argument('--k_qry', type=int, help='k shot for query set', default=15)
    argparser.add_argument(
        '--task_num',
        type=int,
        help='meta batch size, namely task num',
        default=32,
    )
    argparser.add_argument('--seed', type=int, help='random seed', default=1)
    argparser.add_argument('--epochs', type=int, help='epochs', default=10)
    argparser.add_argument('--tasks', type=int, help='meta-batches per epoch', default=100)
    argparser.add_argument('--width', type=int, help='conv channels', default=64)
    argparser.add_argument('--dtype', default='float32', choices=['float32', 'float64'])
    args = argparser.parse_args(argv)

    torch.manual_seed(args.seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(args.seed)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    np.random.seed(args.seed)

    # Set up the (synthetic) Omniglot loader.
    device = torch.device('cuda') if torch.cuda.is_available() else torch.device('cpu')
    db = SyntheticNShot(
        batchsz=args.task_num,
        n_way=args.n_way,
        k_shot=args.k_spt,
        k_query=args.k_qry,
        imgsz=28,
        device=device,
        dtype=getattr(torch, args.dtype),
        n_iter=args.tasks,
        seed=args.seed,
    )

    # A plain PyTorch network.
    w = args.width
    net = nn.Sequential(
        nn.Conv2d(1, w, 3),
        nn.BatchNorm2d(w, momentum=1.0, affine=True),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(w, w, 3),
        nn.BatchNorm2d(w, momentum=1.0, affine=True),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(2, 2),
        nn.Conv2d(w, w, 3),
        nn.BatchNorm2d(w, momentum=1.0, affine=True),
        nn.ReLU(inplace=False),
        nn.MaxPool2d(2, 2),
        nn.Flatten(),
        nn.Linear(w, args.n_way),
    ).to(device, getattr(torch, args.dtype))

    # Adam meta-optimizes the initial weights that the inner loop adapts.
    meta_opt = optim.Adam(net.parameters(), lr=1e-3)

    log = []
    test(db, net, epoch=-1, log=log)
    for epoch in range(args.epochs):
        train(db, net, meta_opt, epoch=epoch, log=log)
        test(db, net, epoch=epoch, log=log)
    return net, log


def train(db, net, meta_opt, epoch, log):
    net.train()
    n_train_iter = db.n_train_iter
    inner_opt = torch.optim.SGD(net.parameters(), lr=1e-1)

    for batch_idx in range(n_train_iter):
        start_time = time.time()
        # A meta-batch of support and query sets.
        x_spt, y_spt, x_qry, y_qry = db.next()

        task_num = x_spt.size(0)

        # The inner loop adapts the weights to each support set.
        n_inner_iter = 5

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

                # The adapted weights' query loss and accuracy (net itself never changed).
                qry_logits = fnet(x_qry[i])
                qry_loss = F.cross_entropy(qry_logits, y_qry[i])
                qry_acc = (qry_logits.argmax(dim=1) == y_qry[i]).float().mean()
                qry_losses.append(qry_loss)
                qry_accs.append(qry_acc.item())

        qry_losses = torch.mean(torch.stack(qry_losses))
        qry_losses.backward()
        meta_opt.step()
        qry_losses = qry_losses.item()
        qry_accs = 100.0 * np.mean(qry_accs)
        i = epoch + float(batch_idx) / n_train_iter
        iter_time = time.time() - start_time

        print(
            f'[Epoch {i:.2f}] Train Loss: {qry_losses:.2f} | Acc: {qry_accs:.2f} | Time: {iter_time:.2f}',
        )
        log.append(
            {
                'epoch': i,
                'loss': qry_losses,
                'acc': qry_accs,
                'mode': 'train',
                'time': time.time(),
            },
        )


def test(db, net, epoch, log):
    # No fine-tuning at test time beyond the inner steps (as in the original).
    net.train()
    n_test_iter = db.n_test_iter
    inner_opt = torch.optim.SGD(net.parameters(), lr=1e-1)

    qry_losses = []
    qry_accs = []

    for _ in range(n_test_iter):
        x_spt, y_spt, x_qry, y_qry = db.next('test')

        task_num = x_spt.size(0)

        n_inner_iter = 5

        for i in range(task_num):
            with migrate.innerloop(net, inner_opt, track=False) as (fnet, diffopt):
                for _ in range(n_inner_iter):
                    spt_logits = fnet(x_spt[i])
                    spt_loss = F.cross_entropy(spt_logits, y_spt[i])
                    diffopt.step(spt_loss)

                qry_logits = fnet(x_qry[i]).detach()
                qry_loss = F.cross_entropy(qry_logits, y_qry[i])
                qry_acc = (qry_logits.argmax(dim=1) == y_qry[i]).float().mean()
                qry_losses.append(qry_loss.item())
                qry_accs.append(qry_acc.item())

    qry_losses = np.mean(qry_losses)
    qry_accs = 100.0 * np.mean(qry_accs)

    print(f'[Epoch {epoch+1:.2f}] Test Loss: {qry_losses:.2f} | Acc: {qry_accs:.2f}')
    log.append(
        {
            'epoch': epoch + 1,
            'loss': qry_losses,
            'acc': qry_accs,
            'mode': 'test',
            'time': time.time(),
        },
    )


if __name__ == '__main__':
    main()
