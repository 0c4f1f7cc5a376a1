"""Train a small deep-equilibrium classifier on scikit-learn's 8x8 digits with torch.

The hidden state is the fixed point ``z* = tanh(z* W^T + x)`` of one layer, where ``x`` is
the encoded image; ``odecore.fixed_point`` finds it with Anderson mixing and differentiates
it implicitly, so memory does not grow with the number of iterations. A small Jacobian
penalty (``odecore.jacobian_frobenius``) keeps the layer contractive, so the solves stay
short as training goes on.

    python examples/deq_classifier.py [--epochs 8]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import odecore

HIDDEN = 48


def equilibrium_map(z, params):
    W, x = params
    return torch.tanh(z @ W.T + x)


class DEQClassifier(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.encode = torch.nn.Linear(64, HIDDEN)
        self.W = torch.nn.Parameter(torch.randn(HIDDEN, HIDDEN) * 0.3 / HIDDEN**0.5)
        self.head = torch.nn.Linear(HIDDEN, 10)

    def forward(self, images):
        x = self.encode(images)
        sol = odecore.solve_fixed_point(
            equilibrium_map,
            torch.zeros_like(x),
            (self.W, x),
            solver="anderson",
            tol=1e-4,
            stop_mode="rel",
            max_iter=30,
            backward_tol=1e-4,
            backward_max_iter=30,
            # A sample still short of tol after max_iter trains from its best iterate rather
            # than stopping the run; the statistics below say how many converged.
            throw=False,
            batch_axis=0,
        )
        return self.head(sol.z), sol, x


def progress(epoch, epochs, done, total, loss, width=30):
    filled = int(width * done / total)
    bar = "#" * filled + "-" * (width - filled)
    sys.stdout.write(f"\repoch {epoch + 1}/{epochs} [{bar}] {done}/{total} mean loss {loss:.3f}")
    sys.stdout.flush()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--jacobian-penalty", type=float, default=0.05)
    args = parser.parse_args(argv)

    # The matrices are small: splitting them across threads costs more than it saves.
    torch.set_num_threads(1)
    torch.manual_seed(0)
    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    train_idx, test_idx = train_test_split(
        range(len(y)), test_size=0.25, random_state=0, stratify=digits.target
    )
    X_train, y_train = X[train_idx], y[train_idx]
    X_test, y_test = X[test_idx], y[test_idx]

    model = DEQClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    forward_iters, backward_iters = [], []
    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(y_train))
        epoch_loss, seen = 0.0, 0
        for i in range(0, len(order), args.batch_size):
            batch = order[i : i + args.batch_size]
            logits, sol, x = model(X_train[batch])
            loss = torch.nn.functional.cross_entropy(logits, y_train[batch])
            if args.jacobian_penalty:
                probe = torch.randn_like(sol.z)
                frob = odecore.jacobian_frobenius(
                    equilibrium_map,
                    sol.z,
                    (model.W, x),
                    probe=probe,
                    batch_axis=0,
                )
                loss = loss + args.jacobian_penalty * frob.mean() / HIDDEN
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            forward_iters.append(sol.iterations.double().mean().item())
            backward_iters.append(sol.stats["backward_iterations"].double().mean().item())
            epoch_loss += loss.item() * len(batch)
            seen += len(batch)
            progress(epoch, args.epochs, seen, len(order), epoch_loss / seen)
        sys.stdout.write("\n")

    with torch.no_grad():
        logits, sol, _ = model(X_test)
    accuracy = (logits.argmax(dim=1) == y_test).double().mean().item()
    print(f"trained in {time.perf_counter() - start:.1f} s")
    print(f"test accuracy: {accuracy:.3f} ({len(y_test)} images)")
    print(
        f"average iterations per batch: forward {sum(forward_iters) / len(forward_iters):.1f}, "
        f"backward {sum(backward_iters) / len(backward_iters):.1f}"
    )
    print(
        f"test-set forward iterations: {sol.iterations.double().mean().item():.1f}, "
        f"converged {int((sol.status == 0).sum())}/{len(y_test)}"
    )
    return accuracy


if __name__ == "__main__":
    main()
