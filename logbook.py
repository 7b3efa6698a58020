"""
log.jsonl and loss.png: one row for each step that evaluates or logs a loss, written as the step ends, and the loss
curve drawn from them when the run ends. Only rank 0 writes them. And the loop's bookkeeping (Bookkeeper): which
steps evaluate, which save the state to resume from, and where the run ends.
"""
import json
import os
import time

from files import write_atomically


class Log:
    """log.jsonl of out_dir, continued from start_step. A resumed run leaves out the rows from its own step on (a
    crash may leave some, and those steps are about to run again); the row of its own step is given back as
    `resumed` (with the evaluation of a run that stopped there, say), to be completed and written anew. The file is
    rewritten when the first row comes: a run stopped before that leaves it as it was."""

    def __init__(self, out_dir, start_step, tokens_per_step, enabled=True):
        self.path, self.tokens_per_step, self.enabled = os.path.join(out_dir, "log.jsonl"), tokens_per_step, enabled
        self.resumed, self.kept, self.file, self.start, self.cpu_start = {}, [], None, time.time(), time.process_time()
        if not (enabled and start_step > 0 and os.path.exists(self.path)):
            return
        with open(self.path) as f:
            for line in f:
                try:
                    logged = json.loads(line)
                except ValueError:  # a line cut short by a kill
                    continue
                if logged["step"] < start_step:
                    self.kept.append(line)
                elif logged["step"] == start_step:
                    self.resumed = {k: v for k, v in logged.items() if k not in ("step", "tokens", "elapsed", "cpu")}

    def row(self, step, values):
        """Append the row of `step`, if it has anything to say."""
        if not (values and self.enabled):
            return
        # cpu: this process's CPU time, which a busy machine does not inflate as it does the wall time
        line = json.dumps(dict(step=step, tokens=step * self.tokens_per_step, **values,
                               elapsed=time.time() - self.start, cpu=time.process_time() - self.cpu_start)) + "\n"
        if self.file is None:  # the first row: the rows kept and it, written whole; the next ones appended
            write_atomically(self.path, lambda f: f.writelines([*self.kept, line]), mode="w")
            self.file = open(self.path, "a")
        else:
            self.file.write(line)
            self.file.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.file is not None:
            self.file.close()


class Bookkeeper:
    """
    What train.py's loop asks at each step, in this order: row(step), its row of log.jsonl; evaluates(step);
    saves(step), the state to resume from; ends(step), the run. A resumed run starts from the row its stopped run
    logged at its step (Log.resumed), and neither evaluates nor saves again what that holds. A Ctrl-C or SIGTERM
    (runtime.StopRequest) makes a step the last, after its evaluation and before its training: saved, its row
    written, and the process ends as the signal would have ended it.
    """

    def __init__(self, start_step, max_iters, eval_interval, log, stop, bar=None):
        self.start_step, self.max_iters, self.eval_interval = start_step, max_iters, eval_interval
        self.log, self.stop, self.bar = log, stop, bar

    def row(self, step):
        self.values = self.log.resumed if step == self.start_step else {}
        self.last_step = step == self.max_iters
        return self.values

    def evaluates(self, step):
        self.evaluating = (step % self.eval_interval == 0 or self.last_step) and "val_loss" not in self.values
        return self.evaluating

    def saves(self, step):
        # a stop is looked for every step (under DDP every log_interval steps); the last step ends the run anyway
        self.signum = 0 if self.last_step else self.stop.requested(step)
        # after an evaluation, but not at the step a resumed run started from: its checkpoint holds that state
        # (a new run starts at step 0 with none)
        return (self.evaluating and (step > self.start_step or step == 0)) or bool(self.signum)

    def ends(self, step):
        if not (self.signum or self.last_step):
            return False
        self.log.row(step, self.values)
        if self.signum:
            if self.bar is not None:
                self.bar.close()  # before the message, which should be the last line
            self.stop.exit(self.signum, step)  # ends the process, as the signal would have
        return True


def plot_losses(out_dir):
    """log.jsonl -> loss.png (written whole, like every file here); matplotlib is optional."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: skipping the loss curve (pip install matplotlib)")
        return
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, label in (("loss", "train (batch)"), ("train_loss", "train (eval)"), ("val_loss", "validation")):
        points = [(r["tokens"], r[key]) for r in rows if key in r]
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if key != "loss" else None, linewidth=1)
    ax.set(xlabel="tokens seen", ylabel="cross-entropy loss (nats/token)", title="training and validation loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomically(os.path.join(out_dir, "loss.png"), lambda f: fig.savefig(f, dpi=120, format="png"))
    plt.close(fig)
