"""Train a small deep-equilibrium classifier on scikit-learn's 8x8 digits with torch.

The hidden state is the fixed point ``z* = tanh(z* W^T + x)`` of one layer, where ``x`` is
the encoded image; ``odecore.fixed_point`` finds it with Anderson mixing and differentiates
it implicitly, so memory does not grow with the number of iterations. A Jacobian penalty
(``odecore.jacobian_frobenius``) keeps the layer contractive, so the solves stay short and the
equilibrium well defined as training goes on; clipping the gradient norm keeps single large
steps from undoing that.

The figures (in ``--out``) show the solver's forward and backward iterations and the test
accuracy per epoch, the residual of the trained model's test-set solve per iteration, and
the test set's confusion matrix.

    python examples/deq_classifier.py [--quick] [--epochs 8] [--seed 0] [--out DIR]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tqdm import tqdm  # noqa: E402

import odecore  # noqa: E402

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
    test_data=None,
):
    """Adam on the cross-entropy plus the Jacobian penalty, over shuffled batches (drawn
    from torch's global generator), for the parameters that require grad. Returns the
    history per epoch: the mean forward and backward iterations per batch and, with
    ``test_data = (X_test, y_test)``, the test accuracy after the epoch."""
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    steps = epochs * -(-len(y) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    history = {"forward_iterations": [], "backward_iterations": [], "test_accuracy": []}
    for _ in tqdm(range(epochs), desc="training", unit="epoch", disable=not show_progress):
        order = torch.randperm(len(y))
        epoch_loss, seen = 0.0, 0
        forward_iters, backward_iters = [], []
        batches = tqdm(
            range(0, len(order), batch_size), desc="batches", leave=False, disable=not show_progress
        )
        for i in batches:
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
            schedule.step()
            forward_iters.append(sol.iterations.double().mean().item())
            backward_iters.append(sol.stats["backward_iterations"].double().mean().item())
            epoch_loss += loss.item() * len(batch)
            seen += len(batch)
            batches.set_postfix(
                loss=f"{epoch_loss / seen:.3f}", iterations=f"{forward_iters[-1]:.1f}"
            )
        history["forward_iterations"].append(sum(forward_iters) / len(forward_iters))
        history["backward_iterations"].append(sum(backward_iters) / len(backward_iters))
        if test_data is not None:
            history["test_accuracy"].append(evaluate(model, *test_data)[0])
    return history


def evaluate(model, X, y):
    """``(accuracy, mean cross-entropy, solution)`` on ``X``, without gradients."""
    with torch.no_grad():
        logits, sol, _ = model(X)
        loss = torch.nn.functional.cross_entropy(logits, y).item()
    accuracy = (logits.argmax(dim=1) == y).double().mean().item()
    return accuracy, loss, sol


def plot(history, sol, predictions, labels, out):
    """Two PNGs in ``out``: the training history with the test solve's residuals, and the
    confusion matrix. Returns their paths."""
    epochs = range(1, len(history["forward_iterations"]) + 1)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(epochs, history["forward_iterations"], marker="o", label="forward (Anderson)")
    axes[0].plot(epochs, history["backward_iterations"], marker="s", label="backward (implicit)")
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("iterations per batch (mean)")
    axes[0].legend()
    axes[1].plot(epochs, [100 * a for a in history["test_accuracy"]], marker="o")
    axes[1].set_xlabel("epoch")
    axes[1].set_ylabel("test accuracy (%)")
    # trace[k] is NaN once a sample has stopped; a stopped sample keeps its last residual.
    trace = sol.trace.double().clone()
    for k in range(1, len(trace)):
        trace[k] = torch.where(torch.isfinite(trace[k]), trace[k], trace[k - 1])
    median = trace.median(dim=1).values
    axes[2].semilogy(range(len(median)), median.numpy(), marker=".")
    axes[2].axhline(1e-4, color="gray", linestyle="--", label="tol")
    axes[2].set_xlabel("iteration")
    axes[2].set_ylabel("relative residual (median)")
    axes[2].set_title("trained model, test set")
    axes[2].legend()
    fig.tight_layout()
    training = out / "deq_classifier_training.png"
    fig.savefig(training, dpi=100)
    plt.close(fig)

    confusion = torch.zeros(10, 10, dtype=torch.long)
    confusion.index_put_((labels, predictions), torch.ones_like(labels), accumulate=True)
    fig, ax = plt.subplots(figsize=(4.6, 4))
    image = ax.imshow(confusion.numpy(), cmap="Blues")
    for (row, col), count in zip(
        torch.cartesian_prod(torch.arange(10), torch.arange(10)).tolist(),
        confusion.flatten().tolist(),
        strict=True,
    ):
        if count:
            on_dark = count > confusion.max().item() / 2
            colour = "white" if on_dark else "black"
            ax.text(col, row, count, ha="center", va="center", fontsize=7, color=colour)
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    matrix = out / "deq_classifier_confusion.png"
    fig.savefig(matrix, dpi=100)
    plt.close(fig)
    return training, matrix


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two epochs: seconds")
    parser.add_argument("--epochs", type=int, default=None, help="default 8 (2 with --quick)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--jacobian-penalty", type=float, default=1.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="seeds the weights and the batches")
    parser.add_argument("--threads", type=int, default=1, help="torch's intra-op threads")
    parser.add_argument("--out", type=Path, default=Path("."), help="directory for the PNGs")
    args = parser.parse_args(argv)
    epochs = (2 if args.quick else 8) if args.epochs is None else args.epochs
    if min(epochs, args.batch_size) < 1:
        parser.error("--epochs and --batch-size must be positive")
    args.out.mkdir(parents=True, exist_ok=True)

    # The matrices are small: splitting them across threads costs more than it saves, and
    # one thread sums in one order, so a run repeats exactly on the same machine.
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    X_train, y_train, X_test, y_test = load_data()

    model = DEQClassifier()
    start = time.perf_counter()
    history = train(
        model,
        X_train,
        y_train,
        epochs=epochs,
        batch_size=args.batch_size,
        jacobian_penalty=args.jacobian_penalty,
        max_grad_norm=args.max_grad_norm,
        test_data=(X_test, y_test),
    )
    trained = time.perf_counter() - start
    accuracy, _, sol = evaluate(model, X_test, y_test)
    with torch.no_grad():
        predictions = model.head(sol.z).argmax(dim=1)
    figures = plot(history, sol, predictions, y_test, args.out)
    forward_iters = sum(history["forward_iterations"]) / epochs
    backward_iters = sum(history["backward_iterations"]) / epochs
    print(f"trained in {trained:.1f} s")
    print(f"test accuracy: {accuracy:.3f} ({len(y_test)} images)")
    print("test accuracy per epoch: " + " ".join(f"{a:.3f}" for a in history["test_accuracy"]))
    print(
        f"average iterations per batch: forward {forward_iters:.1f}, backward {backward_iters:.1f}"
    )
    print(
        "forward/backward iterations per epoch: "
        + " ".join(
            f"{f:.1f}/{b:.1f}"
            for f, b in zip(
                history["forward_iterations"], history["backward_iterations"], strict=True
            )
        )
    )
    print(
        f"test-set forward iterations: {sol.iterations.double().mean().item():.1f}, "
        f"converged {int((sol.status == 0).sum())}/{len(y_test)}"
    )
    print("figures:", ", ".join(str(path) for path in figures))
    return accuracy


if __name__ == "__main__":
    main()
