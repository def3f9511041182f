"""`edgesmith suggest-labels`: which unlabelled images to label next.

Without labels (a config with neither data.labels_per_class nor data.labels_file) it ranks the training images
by TypiClust (Hacohen et al., ICML 2022): the frozen teacher's penultimate features, k-means into as many clusters
as images asked for, and from each cluster, largest first, its most typical image (the inverse of the mean distance
to its nearest neighbours in the cluster). Typical images of distinct clusters cover the data's modes with few
labels, where the most uncertain images (outliers, at low budgets) would not.

With labels (a budget or a labels file, the adapt stage trained a head) it ranks the unlabelled pool: k-means
into as many clusters as images asked for, over the pool and the labelled images; clusters with the fewest labels
first (the largest of them first), taking the most typical image of a cluster without any label (a mode the labels
miss) and the most uncertain one (the adapted teacher's smallest top-2 margin, and first where the distilled
student disagrees with it, when a distill stage is cached) of a cluster that has some. One image per cluster until
every cluster had its turn. (TypiClust's own rule, labelled + asked-for clusters, leaves at least one cluster
without labels per image asked for, so it would never ask where the model is unsure.)
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError
from .seeds import seed_for

PCA_DIMS = 64            # k-means and distances on the top principal components of the L2-normalised features
NEIGHBOURS = 20          # typicality: mean distance to this many nearest neighbours in the cluster (TypiClust)
MIN_CLUSTER = 5          # smaller clusters are outliers: their turn comes after every larger one's
KMEANS_ITERATIONS = 100
SHEET_IMAGES = 64        # images on the contact sheet
CSV_NAME, SHEET_NAME = "suggestions.csv", "suggestions.png"


@dataclass(frozen=True)
class Candidates:
    """The images to rank (uint8 N x C x H x W) and how the user names them; `labelled`: the images that already
    have labels (for clusters they cover), or None without labels."""

    images: np.ndarray
    ids: list[str]
    labelled: np.ndarray | None
    data: object | None              # the SubtaskData with labels, else None


@dataclass(frozen=True)
class Suggestion:
    image: str
    rank: int
    score: float
    why: str


def candidates(cfg) -> Candidates:
    """The pool the config describes: every training image without labels (capped like the pool), else the
    unlabelled pool of its budget or labels file."""
    from .data.for_config import subtask_data
    from .data.sources import load_dataset, training_ids

    unlabelled = cfg.data.unlabelled
    if unlabelled not in (None, "rest", "none"):
        raise ConfigError(f"data.unlabelled is the folder '{unlabelled}': suggest-labels ranks the dataset's own "
                          "training images, which a labels file can name, not a folder's.",
                          "Leave data.unlabelled unset or set it to rest for suggest-labels.")
    if not cfg.data.few_labels:
        dataset = load_dataset(cfg.data)
        index = _capped(len(dataset.train), cfg.data.unlabelled_max_images, cfg.build.seed)
        ids = training_ids(cfg.data, dataset)
        return Candidates(dataset.train.images[index], [ids[i] for i in index], None, None)
    data = subtask_data(cfg)
    if data.pool is None or data.pool_index is None:
        raise ConfigError("This config has no unlabelled pool (data.unlabelled: none): there is nothing to rank.",
                          "Set data.unlabelled: rest (or leave it unset) to rank the other training images.")
    ids = training_ids(cfg.data, data.dataset)
    return Candidates(data.pool.images, [ids[i] for i in data.pool_index],
                      np.concatenate([data.train.images, data.val.images]), data)


def _capped(n: int, cap: int | None, seed: int) -> np.ndarray:
    if cap is None or cap >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed_for(seed, "suggest.pool")).permutation(n)[:cap])


def check_count(count: int, pool: int) -> None:
    if count < 1:
        problem = f"--count {count}: suggest-labels needs to suggest at least one image."
    elif count > pool:
        problem = f"--count {count} asks for more images than the unlabelled pool holds ({pool})."
    else:
        return
    raise ConfigError(problem, f"Ask for between 1 and {pool} images (the unlabelled pool of this config).")


# -- features and clusters ---------------------------------------------------------------------------------------

@torch.inference_mode()
def penultimate(model: torch.nn.Module, view, images: np.ndarray, device, batch: int = 256) -> torch.Tensor:
    """The input of the model's last Linear layer (timm's pre-logits features; a SmallCNN's pooled features)."""
    from .data.views import as_tensor

    classifier = model.get_classifier()
    last = classifier[-1] if isinstance(classifier, torch.nn.Sequential) else classifier
    captured = []
    hook = last.register_forward_pre_hook(lambda _m, args: captured.append(args[0].float().flatten(1).cpu()))
    try:
        model.to(device).eval()
        source = as_tensor(images)
        for start in range(0, len(source), batch):
            model(view(source[start:start + batch].to(device)))
    finally:
        hook.remove()
    return torch.cat(captured)


def embed(features: torch.Tensor, dims: int = PCA_DIMS) -> torch.Tensor:
    """L2-normalised, centred, projected on the top principal components (exact: eigh of the covariance)."""
    x = torch.nn.functional.normalize(features.double(), dim=1)
    x = x - x.mean(0)
    if x.shape[1] <= dims:
        return x.float()
    _, vectors = torch.linalg.eigh(x.T @ x)
    basis = vectors[:, -dims:].flip(1)
    basis = basis * torch.sign(basis[basis.abs().argmax(0), torch.arange(dims)])   # a fixed sign per component
    return (x @ basis).float()


def kmeans(x: torch.Tensor, k: int, seed: int) -> torch.Tensor:
    """Seeded k-means++ and Lloyd iterations; returns each point's cluster (0..k-1, every cluster non-empty)."""
    generator = torch.Generator().manual_seed(seed)
    centres = x[_kmeans_pp(x, k, generator)]
    assign = None
    for _ in range(KMEANS_ITERATIONS):
        new = _nearest(x, centres)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        centres = torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], centres)
    return torch.unique(assign, return_inverse=True)[1]      # renumbered: an emptied cluster leaves no gap


def _kmeans_pp(x: torch.Tensor, k: int, generator: torch.Generator) -> list[int]:
    chosen = [int(torch.randint(len(x), (1,), generator=generator))]
    d2 = ((x - x[chosen[0]]) ** 2).sum(1)
    for _ in range(1, k):
        weights = d2 / d2.sum() if d2.sum() > 0 else torch.ones_like(d2) / len(d2)
        nxt = int(torch.multinomial(weights.double(), 1, generator=generator))
        chosen.append(nxt)
        d2 = torch.minimum(d2, ((x - x[nxt]) ** 2).sum(1))
    return chosen


def _nearest(x: torch.Tensor, centres: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
    out = []
    for start in range(0, len(x), chunk):
        out.append(torch.cdist(x[start:start + chunk], centres).argmin(1))
    return torch.cat(out)


def typicality(x: torch.Tensor, neighbours: int = NEIGHBOURS, chunk: int = 2048) -> torch.Tensor:
    """1 / mean distance to the `neighbours` nearest other points (TypiClust's density); one point alone: 0."""
    if len(x) < 2:
        return torch.zeros(len(x))
    k = min(neighbours, len(x) - 1)
    out = []
    for start in range(0, len(x), chunk):
        d = torch.cdist(x[start:start + chunk], x)
        out.append(1.0 / (d.topk(k + 1, largest=False).values[:, 1:].mean(1) + 1e-8))   # [:, 0] is the point itself
    return torch.cat(out)


# -- choosing ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Uncertainty:
    """Per candidate: the adapted teacher's top-2 margin (softmax over the subtask), and, when a distilled student
    is cached, whether it disagrees with the teacher (with both answers)."""

    margin: np.ndarray
    teacher: list[str]
    student: list[str] | None

    @property
    def score(self) -> np.ndarray:
        """1 - margin; an image the student gets differently from the teacher ranks above every one it agrees on."""
        return 1.0 - self.margin + (self.disagrees().astype(float) if self.student is not None else 0.0)

    def disagrees(self) -> np.ndarray:
        return np.array([t != s for t, s in zip(self.teacher, self.student or self.teacher)])

    def why(self, i: int) -> str:
        text = f"teacher margin {self.margin[i]:.2f}"
        if self.student is not None and self.teacher[i] != self.student[i]:
            text += f"; teacher says {self.teacher[i]}, student says {self.student[i]}"
        return text


def select(x: torch.Tensor, n_candidates: int, count: int, seed: int,
           uncertain: Uncertainty | None = None) -> list[tuple[int, float, str]]:
    """(candidate, score, why) in rank order. `x`: embeddings of the candidates, then of the labelled images."""
    labelled = len(x) - n_candidates
    assign = kmeans(x, min(len(x), count), seed_for(seed, "suggest.kmeans"))
    k = int(assign.max()) + 1
    typical = torch.zeros(len(x))
    for c in range(k):
        members = torch.nonzero(assign == c).flatten()
        typical[members] = typicality(x[members])
    sizes = torch.bincount(assign, minlength=k).tolist()
    labels_in = torch.bincount(assign[n_candidates:], minlength=k).tolist() if labelled else [0] * k
    score = uncertain.score if uncertain is not None else None
    queues = {c: _preference(torch.nonzero(assign[:n_candidates] == c).flatten().tolist(), typical,
                             score if labels_in[c] else None) for c in range(k)}
    taken, picks = [0] * k, []
    while len(picks) < count:
        c = _next_cluster(queues, sizes, labels_in, taken, score)
        i = queues[c].pop(0)
        picks.append(_pick(i, c, sizes[c], labels_in[c], taken[c], typical, uncertain))
        taken[c] += 1
    return picks


def _preference(members: list[int], typical: torch.Tensor, score: np.ndarray | None) -> list[int]:
    """A cluster's candidates, best first: most typical, or (a cluster with labels) most uncertain."""
    if score is None:
        return sorted(members, key=lambda i: (-float(typical[i]), i))
    return sorted(members, key=lambda i: (-float(score[i]), i))


def _next_cluster(queues: dict, sizes: list[int], labels_in: list[int], taken: list[int], score) -> int:
    """Fewest labels (given + suggested) first; among those, clusters of at least MIN_CLUSTER images before the
    smaller ones (outliers), then the largest cluster, or for a cluster with labels the one whose best candidate is
    most uncertain."""
    def order(c):
        second = -float(score[queues[c][0]]) if (score is not None and labels_in[c]) else -sizes[c]
        return labels_in[c] + taken[c], sizes[c] < MIN_CLUSTER, second, c

    return min((c for c, q in queues.items() if q), key=order)


def _pick(i: int, c: int, size: int, labels: int, taken: int, typical: torch.Tensor,
          uncertain: Uncertainty | None) -> tuple[int, float, str]:
    if uncertain is not None and labels:
        return i, float(uncertain.score[i]), (f"uncertain in cluster {c} ({size} images, {labels} labelled): "
                                              f"{uncertain.why(i)}")
    state = "no label yet" if not labels and not taken else f"{labels + taken} labelled or suggested already"
    return i, float(typical[i]), f"typical of cluster {c} ({size} images, {state})"


# -- the command ---------------------------------------------------------------------------------------------------

def stage_folders(cfg, progress) -> dict[str, Path]:
    """Builds (or finds cached) the stages suggest-labels reads: teacher, and with labels adapt; a distill stage
    is used only when it is already cached (suggesting never trains a student)."""
    from .runner import Build

    build = Build(cfg)
    until = "adapt" if cfg.data.few_labels else "teacher"
    folders = {row["stage"]: Path(row["dir"]) for row in build.run(progress, until=until)}
    if cfg.data.few_labels:
        distill = next((p for p in build.plan(until="distill") if p.stage.name == "distill"), None)
        if distill is not None and build.cache.lookup("distill", distill.key) is not None:
            folders["distill"] = build.cache.path("distill", distill.key)
    return folders


def uncertainty(cfg, folders: dict[str, Path], cand: Candidates, device) -> Uncertainty:
    from .models import load_student, load_teacher
    from .models.adapt import teacher_class_ids
    from .models.known_logits import KnownLogits, teacher_logits
    from .models.predict import predict_logits

    names = cand.data.class_names
    model, spec = load_teacher(folders["adapt"])
    logits = teacher_logits(model, spec.input, cand.images, device, teacher_class_ids(list(spec.class_names), cand.data),
                            KnownLogits.load(folders["adapt"]))
    top2 = logits.softmax(1).topk(2, dim=1).values
    teacher = [names[j] for j in logits.argmax(1).tolist()]
    student = None
    if "distill" in folders:
        model, spec = load_student(folders["distill"])
        student = [names[j] for j in predict_logits(model.to(device), spec.input, cand.images, device).argmax(1).tolist()]
    return Uncertainty((top2[:, 0] - top2[:, 1]).numpy(), teacher, student)


def suggest(cfg, count: int, progress) -> tuple[list[Suggestion], Candidates]:
    """The ranked suggestions for a config (builds or reuses the stages it reads)."""
    cand = candidates(cfg)
    return rank(cfg, cand, count, progress), cand


def rank(cfg, cand: Candidates, count: int, progress) -> list[Suggestion]:
    """The ranking of given candidates (suggest's; a benchmark may pass other candidates)."""
    from .models import load_teacher
    from .runner import resolve_device

    check_count(count, len(cand.images))
    folders = stage_folders(cfg, progress)
    device = torch.device(resolve_device(cfg.build.device))
    model, spec = load_teacher(folders["teacher"])
    images = cand.images if cand.labelled is None else np.concatenate([cand.images, cand.labelled])
    progress.log(f"embedding {len(images)} images with the teacher's penultimate features")
    x = embed(penultimate(model, spec.input, images, device))
    uncertain = uncertainty(cfg, folders, cand, device) if cand.labelled is not None else None
    picks = select(x, len(cand.images), count, cfg.build.seed, uncertain)
    return [Suggestion(cand.ids[i], r, round(score, 6), why) for r, (i, score, why) in enumerate(picks, 1)]


def write_csv(path: Path, suggestions: list[Suggestion]) -> None:
    """image, rank, score, why and an empty label column: fill it in and use the file as data.labels_file."""
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "rank", "score", "why", "label"])
        writer.writerows([s.image, s.rank, f"{s.score:.6g}", s.why, ""] for s in suggestions)


def write_sheet(path: Path, suggestions: list[Suggestion], cand: Candidates, limit: int = SHEET_IMAGES) -> None:
    """A contact sheet of the first suggestions, each captioned with its rank and id."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where = {image_id: i for i, image_id in enumerate(cand.ids)}
    shown = suggestions[:limit]
    cols = min(8, len(shown))
    rows = -(-len(shown) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(1.4 * cols, 1.55 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, s in zip(axes.flat, shown):
        image = cand.images[where[s.image]]
        ax.imshow(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0), cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"#{s.rank} {s.image[-14:]}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
