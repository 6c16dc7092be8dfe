"""On the GPU machine (scripts/gpu/README.md): the shared copy's materialize.py, its JPEG decoding spread over the
machine's cores (same names, same order, same arrays). argv: the folder holding train/ and test/,
the destination."""
import io
import os
import sys
import zipfile
from multiprocessing import Pool

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import materialize as m  # noqa: E402

SRC, DEST = sys.argv[1], sys.argv[2]
ZIP = os.path.join(SRC, "cifar10-jpeg.zip")
with zipfile.ZipFile(ZIP, "w", zipfile.ZIP_STORED) as z:
    for split in ("train", "test"):
        for root, _, files in os.walk(os.path.join(SRC, split)):
            for f in files:
                p = os.path.join(root, f)
                z.write(p, os.path.relpath(p, SRC))
m.ZIP = ZIP


def decode(names):
    with zipfile.ZipFile(ZIP) as z:
        return np.stack([np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB"), dtype=np.uint8) for n in names])


def read_split(z, split):
    names = sorted(n for n in z.namelist() if n.startswith(split + "/") and n.endswith(".jpg"))
    chunks = [names[i:i + 2000] for i in range(0, len(names), 2000)]
    with Pool(min(16, os.cpu_count() or 1)) as pool:
        x = np.concatenate(pool.map(decode, chunks))
    y = np.array([m.CLASSES.index(n.split("/")[1]) for n in names])
    return x, y, names


m.read_split = read_split
m.main(DEST)
