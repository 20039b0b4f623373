"""`python tests/run_with_digest.py SCRIPT ARGS...` runs an example script as `python SCRIPT ARGS...` does (its
`__main__` block included), then prints each process's final parameter digest: the data-parallel tests compare the
replicas' weights, which only the processes themselves hold (rank 0 alone saves the model).

It also prints how many threads of a torch.distributed backend are still running once the script is done. There should
be none: the scripts destroy their process group, and a gloo worker thread that outlives it can still be releasing
tensors when the interpreter shuts down, which aborts the process ("terminate called without an active exception")
after its work is done."""

import runpy
import sys
from pathlib import Path

import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import parameter_digest  # noqa: E402

# Only the digests are kept, not the Trainers: a Trainer holds the DDP model, which holds the process group and its
# threads, and would keep them alive past the script's `destroy_process_group`.
digests = []
train = transformers.Trainer.train


def train_then_record_digest(self, *args, **kwargs):
    result = train(self, *args, **kwargs)
    digest = parameter_digest(self.accelerator.unwrap_model(self.model))
    digests.append((self.args.process_index, self.args.world_size, digest))
    return result


def backend_threads() -> int | None:
    """The number of this process's threads named by gloo (its transport loop and the process group's workers), or
    None without Linux's /proc."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    names = []
    for task in tasks.iterdir():
        try:
            names.append((task / "comm").read_text().strip())
        except OSError:  # the thread ended meanwhile
            pass
    return sum("gloo" in name for name in names)


transformers.Trainer.train = train_then_record_digest
script = Path(sys.argv[1]).resolve()
sys.argv = sys.argv[1:]
sys.path.insert(0, str(script.parent))
runpy.run_path(str(script), run_name="__main__")
for rank, world_size, digest in digests:
    print(f"[rank {rank}/{world_size}] final parameter digest {digest}", flush=True)
    print(f"[rank {rank}/{world_size}] backend threads at exit {backend_threads()}", flush=True)
