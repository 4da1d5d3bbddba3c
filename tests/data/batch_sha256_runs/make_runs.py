"""How the runs beside this file were made: edgelearn at commit 2031340, before step records
held `batch_digest` (their records hold `batch_sha256`, their headers no `batch_identity`).

    python tests/data/batch_sha256_runs/make_runs.py /tmp/old

then tpsgd_data/journal.bin (6 steps) and tpsgd_live/{journal,samples}.bin (5 steps) were
copied here, and expected.json lists the `batch_sha256` of every step of the uninterrupted
10-step (data) and 8-step (live) runs. Run with today's edgelearn it writes new-scheme runs.
"""

import shutil
import sys
from pathlib import Path

import edgelearn as el
from edgelearn.demo import DATA, demo_data

out = Path(sys.argv[1])
shutil.rmtree(out, ignore_errors=True)
bundle = el.load_bundle(DATA / "demo")
train, _, _ = demo_data(0)
RT = el.RuntimeConfig(backend="onnxruntime", threads=1, device=None)
TPD = el.TrainConfig(optimizer="tpsgd", options={"lr": 0.1}, trainable="head.*", seed=3,
                     batch_size=8, checkpoint_every=4)
TPL = el.TrainConfig(optimizer="tpsgd", options={"lr": 0.1}, trainable="head.*", seed=3,
                     checkpoint_every=4, record_samples=True)
for name, n in (("tpsgd_data", 6), ("tpsgd_data_10", 10)):
    with el.Session(bundle, out / name, TPD, RT) as s:
        s.run(train, n)
for name, n in (("tpsgd_live", 5), ("tpsgd_live_8", 8)):
    with el.Session(bundle, out / name, TPL, RT) as s:
        for i in range(n):
            s.step((train.x[i], train.y[i]))
