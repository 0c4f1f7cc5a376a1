"""Train a small deep-equilibrium classifier on scikit-learn's 8x8 digits with torch.

The hidden state is the fixed point ``z* = tanh(z* W^T + x)`` of one layer, where ``x`` is
the encoded image; ``odecore.fixed_point`` finds it with Anderson mixing and differentiates
it implicitly, so memory does not grow with the number of iterations. A Jacobian penalty
(``odecore.jacobian_frobenius``) keeps the layer contractive, so the solves stay short and the
equilibrium well defined as training goes on; clipping the gradient norm keeps single large
steps from undoing that.

    python examples/deq_classifier.py [--epochs 8] [--seed 0]
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


def load_data():
    """The digits as float32 images in [0, 1], split 3:1 into training and test sets, the
    same split on every run."""
    digits = load_digits()
    X = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target)
    train_idx, test_idx = train_test_split(
        range(len(y)), test_size=0.25, random_state=0, stratify=digits.target
    )
    return X[train_idx], y[train_idx], X[test_idx], y[test_idx]


def progress(epoch, epochs, done, total, loss, width=30):
    filled = int(width * done / total)
    bar = "#" * filled + "-" * (width - filled)
    sys.stdout.write(f"\repoch {epoch + 1}/{epochs} [{bar}] {done}/{total} mean loss {loss:.3f}")
    sys.stdout.flush()


def train(
    model,
    X,
    y,
    *,
    epochs,
    batch_size=64,
    jacobian_penalty=1.0,
    max_grad_norm=1.0,
    lr=5e-3,
    show_progress=True,
):
    """Adam on the cross-entropy plus the Jacobian penalty, over shuffled batches (drawn
    from torch's global generator), for the parameters that require grad. Returns the mean
    forward and backward iterations per batch."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    forward_iters, backward_iters = [], []
    for epoch in range(epochs):
        order = torch.randperm(len(y))
        epoch_loss, seen = 0.0, 0
        for i in range(0, len(order), batch_size):
            batch = order[i : i + batch_size]
            logits, sol, x = model(X[batch])
            loss = torch.nn.functional.cross_entropy(logits, y[batch])
            if jacobian_penalty:
                # ||J||_F^2 / HIDDEN: the mean squared gain of the layer in one direction.
                frob = odecore.jacobian_frobenius(
                    equilibrium_map,
                    sol.z,
                    (model.W, x),
                    probe=torch.randn_like(sol.z),
                    batch_axis=0,
                )
                loss = loss + jacobian_penalty * frob.mean() / HIDDEN
            optimizer.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
            optimizer.step()
            forward_iters.append(sol.iterations.double().mean().item())
            backward_iters.append(sol.stats["backward_iterations"].double().mean().item())
            epoch_loss += loss.item() * len(batch)
            seen += len(batch)
            if show_progress:
                progress(epoch, epochs, seen, len(order), epoch_loss / seen)
        if show_progress:
            sys.stdout.write("\n")
    return sum(forward_iters) / len(forward_iters), sum(backward_iters) / len(backward_iters)


def evaluate(model, X, y):
    """``(accuracy, mean cross-entropy, solution)`` on ``X``, without gradients."""
    with torch.no_grad():
        logits, sol, _ = model(X)
        loss = torch.nn.functional.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(dim=1) == y).double().mean().item()
    return accuracy, loss, sol


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--jacobian-penalty", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the batches")
    args = parser.parse_args(argv)

    # The matrices are small: splitting them across threads costs more than it saves, and
    # one thread sums in one order, so a run repeats exactly on the same machine.
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    X_train, y_train, X_test, y_test = load_data()

    model = DEQClassifier()
    start = time.perf_counter()
    forward_iters, backward_iters = train(
        model,
        X_train,
        y_train,
        epochs=args.epochs,
        batch_size=args.batch_size,
        jacobian_penalty=args.jacobian_penalty,
        max_grad_norm=args.max_grad_norm,
    )
    accuracy, _, sol = evaluate(model, X_test, y_test)
    print(f"trained in {time.perf_counter() - start:.1f} s")
    print(f"test accuracy: {accuracy:.3f} ({len(y_test)} images)")
    print(
        f"average iterations per batch: forward {forward_iters:.1f}, backward {backward_iters:.1f}"
    )
    print(
        f"test-set forward iterations: {sol.iterations.double().mean().item():.1f}, "
        f"converged {int((sol.status == 0).sum())}/{len(y_test)}"
    )
    return accuracy


if __name__ == "__main__":
    main()
