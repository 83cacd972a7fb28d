"""Text-to-image search over a folder (`vlbridge serve MODEL --index DIR`), for models with retrieval heads.

At start-up every image file under DIR is embedded once: its query projections (Q, E), for ITC, and the
frozen vision encoder's output (v, Dv), so that ITM re-ranking runs no vision encoder at query time. The
embeddings are cached in one safetensors file whose name hashes what they depend on: the files (relative
path, size, modification time), the model's weights, the image preprocessing and the pixel limit; a
changed folder or model misses the cache and embeds again. Files that do not decode are skipped,
counted and logged (and remembered in the cache).

A query ranks like `vlbridge.evaluation.generation.rank_images`: ITC for every image, then the top
`rerank` re-scored with ITM + ITC (Blip2.retrieval_scores' rules).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from vlbridge.core import images as core_images
from vlbridge.core.images import ImageError, load_image
from vlbridge.serving.schemas import APIError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
BATCH = 32  # images through the encoder at once while indexing


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vlbridge" / "index"


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer: name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}\t{t.dtype}\t{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@dataclass
class Hit:
    name: str
    score: float  # the re-ranked score (ITM + ITC), or the ITC cosine when nothing is re-ranked
    itc: float  # ITC cosine similarity (max over queries)


class ImageIndex:
    """The embedded images of a folder: names (paths relative to it), query projections (N, Q, E) and
    vision encoder outputs (N, v, Dv); `skipped` names the files that did not decode."""

    def __init__(self, root: Path, names: list[str], queries: torch.Tensor, features: torch.Tensor, skipped: list):
        self.root, self.names, self.queries, self.features, self.skipped = root, names, queries, features, skipped
        self.positions = {n: i for i, n in enumerate(names)}
        self.cache_path: Path | None = None
        self.from_cache = False

    def __len__(self) -> int:
        return len(self.names)

    @classmethod
    def build(cls, model, processor, directory: str | Path, cache_dir: str | Path | None = None) -> ImageIndex:
        from safetensors.torch import load_file, save_file

        model.require_task("retrieval")
        root = Path(directory).expanduser().resolve()
        if not root.is_dir():
            raise ValueError(f"--index {directory}: not a directory")
        files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        stats = [(p.relative_to(root).as_posix(), p.stat()) for p in files]
        identity = {
            "files": [[n, s.st_size, s.st_mtime_ns] for n, s in stats],
            "weights": weights_digest(model),
            "preprocessing": processor.image_processor.to_dict(),
            "max_pixels": core_images.MAX_PIXELS,
        }
        key = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:20]
        path = Path(cache_dir or default_cache_dir()).expanduser() / f"index-{key}.safetensors"
        if path.exists():
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata()
            stored = load_file(str(path))
            index = cls(
                root, json.loads(meta["names"]), stored["queries"], stored["features"], json.loads(meta["skipped"])
            )
            index.cache_path, index.from_cache = path, True
            log.info("index: %d images of %s from the cache %s", len(index), root, path)
        else:
            index = cls._embed(model, processor, root, [n for n, _ in stats])
            path.parent.mkdir(parents=True, exist_ok=True)
            tensors = {"queries": index.queries.contiguous(), "features": index.features.contiguous()}
            meta = {"names": json.dumps(index.names), "skipped": json.dumps(index.skipped), "key": key}
            tmp = path.with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata=meta)
            tmp.replace(path)  # a reader never sees half a file
            index.cache_path = path
            log.info("index: embedded %d images of %s, cached to %s", len(index), root, path)
        index.queries = index.queries.to(model.device)  # every query reads them all; candidates' features move
        if index.skipped:
            shown = "; ".join(f"{n} ({why})" for n, why in index.skipped[:10])
            more = f" and {len(index.skipped) - 10} more" if len(index.skipped) > 10 else ""
            log.warning("index: skipped %d unreadable files of %s: %s%s", len(index.skipped), root, shown, more)
        return index

    @classmethod
    @torch.no_grad()
    def _embed(cls, model, processor, root: Path, names: list[str]) -> ImageIndex:
        kept, skipped, queries, features = [], [], [], []
        for s in range(0, len(names), BATCH):
            batch = []
            for name in names[s : s + BATCH]:
                try:
                    batch.append(load_image(root / name))
                    kept.append(name)
                except (ImageError, OSError) as e:
                    skipped.append([name, " ".join(str(e).split())[:200]])
            if not batch:
                continue
            inputs = model.prepare_inputs({"pixel_values": processor.images(batch)})
            feats = model.vision(inputs["pixel_values"])  # (B, v, Dv): the frozen encoder's image_features
            queries.append(model.extract_features(image_features=feats).image_embeds_proj.cpu())  # (B, Q, E)
            features.append(feats.cpu())
        if not kept:
            return cls(root, [], torch.empty(0), torch.empty(0), skipped)
        return cls(root, kept, torch.cat(queries), torch.cat(features), skipped)

    @torch.no_grad()
    def search(self, model, processor, query: str, top_k: int, rerank: int, rule: str) -> tuple[list[Hit], int]:
        """The top_k images for `query`, best first, and the Q-Former tokens the query took. rerank: how
        many ITC candidates ITM re-scores (0: rank by ITC alone); at least top_k otherwise."""
        if not len(self):
            return [], 0
        try:
            q = processor.qformer_text([query])
        except ValueError as e:
            raise APIError(400, str(e), "query") from None
        q = model.prepare_inputs({"qformer_input_ids": q["input_ids"], "qformer_attention_mask": q["attention_mask"]})
        ids, mask = q["qformer_input_ids"], q["qformer_attention_mask"]
        text = model.extract_features(ids, mask).text_embeds_proj[0]  # (E,)
        itc = torch.einsum("nqe,e->nq", self.queries.to(text), text).amax(-1).float()  # (N,) as Blip2.itc
        tokens = int(mask.sum())
        if rerank == 0:
            order = itc.argsort(descending=True)[:top_k].tolist()
            return [Hit(self.names[i], float(itc[i]), float(itc[i])) for i in order], tokens
        top = itc.topk(min(rerank, len(self))).indices
        # the candidates through the model's own re-ranking (its ITC again, on them only, then ITM + ITC)
        scores = model.retrieval_scores(
            ids, mask, image_features=self.features[top].to(text.device), k=len(top), rerank=rule
        )
        rescored, sim = scores.t2i[0].float(), scores.itc[:, 0].float()
        best = rescored.argsort(descending=True)[:top_k].tolist()
        return [Hit(self.names[int(top[i])], float(rescored[i]), float(sim[i])) for i in best], tokens

    def file(self, name: str) -> Path:
        """The file behind an indexed name; any other name (paths outside the index included) is a 404."""
        if name not in self.positions:
            raise APIError(404, f"{name!r} is not an image of this server's index", "name", type="not_found_error")
        path = self.root / name
        if not path.is_file():
            raise APIError(404, f"{name!r} is no longer on disk", "name", type="not_found_error")
        return path
