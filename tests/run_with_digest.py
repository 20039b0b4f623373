"""`python tests/run_with_digest.py SCRIPT ARGS...` runs an example script as `python SCRIPT ARGS...` does (its
`__main__` block included), then prints each process's final parameter digest: the data-parallel tests compare the
replicas' weights, which only the processes themselves hold (rank 0 alone saves the model)."""

import runpy
import sys
from pathlib import Path

import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import parameter_digest  # noqa: E402

trainers = []
train = transformers.Trainer.train


def recording_train(self, *args, **kwargs):
    trainers.append(self)
    return train(self, *args, **kwargs)


transformers.Trainer.train = recording_train
script = Path(sys.argv[1]).resolve()
sys.argv = sys.argv[1:]
sys.path.insert(0, str(script.parent))
runpy.run_path(str(script), run_name="__main__")
for trainer in trainers:
    digest = parameter_digest(trainer.accelerator.unwrap_model(trainer.model))
    print(f"[rank {trainer.args.process_index}/{trainer.args.world_size}] final parameter digest {digest}", flush=True)
