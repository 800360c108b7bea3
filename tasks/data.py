"""Dataset fetchers: local paths under `data_root()`, downloaded from the canonical source when missing.

Every fetcher returns what is already on disk without touching the network. When something is
missing it downloads the upstream archive into a hidden staging folder beside the destination,
pulls out only the members it needs, checks their sha256 where a published value exists, and
renames them into place: a failed or interrupted download leaves nothing half-written. Without
network the error (MissingFileError) says which folder to fill and from where.
"""
from __future__ import annotations

import hashlib
import re
import shutil
import tarfile
import tempfile
import zipfile
from pathlib import Path

from models.download import MissingFileError, data_root, download, sha256_file

MMLU_URL = "https://people.eecs.berkeley.edu/~hendrycks/data.tar"
MMLU_SPLITS = ("dev", "val", "test")
# sha256 of each split's CSVs concatenated in byte-sorted file-name order (shared/data/README.md)
MMLU_SPLIT_SHA256 = {
    "dev": "b27648cd4b1d389de3362e154cc52fe0b62c0533af585420446dc5583ac8272f",
    "val": "dc3d69b3a06dd3a56d1f8014a103ca4dfe106dd7bc73ae06c44539767b482a73",
    "test": "fa58faff5210aee66e8791f191a56016fa3d33be6b7f484a1463ae5984b834e0",
}

WIKITEXT2_RAW_URL = "https://s3.amazonaws.com/research.metamind.io/wikitext/wikitext-2-raw-v1.zip"
WIKITEXT2_RAW_FILES = ("wiki.test.raw", "wiki.valid.raw", "wiki.train.raw")

SMS_SPAM_URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
SMS_SPAM_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"

ARC_URL = "https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip"
ARC_SHA256 = {
    "ARC-Challenge/ARC-Challenge-Test.jsonl": "9fa8ffb3e3a1f88cb302d53dd95aae81e39209ad9bcf974376b319d8fd35717c",
    "ARC-Challenge/ARC-Challenge-Dev.jsonl": "55224364abd2477f66a9a57c5cbef109fb71d83019aa5e37aec0e7ab757746ca",
    "ARC-Easy/ARC-Easy-Test.jsonl": "ce32a0774b4beb1977d2c6b16dda5dd2b24fdc9c7f506882c452678676bd09be",
    "ARC-Easy/ARC-Easy-Dev.jsonl": "f4364b808a68df6bf500ce1070fb0105d40cacd2391c210deb00ff83ba75d1f4",
}
# lm-eval draws ARC's few-shot examples from these; fetched only when a task asks for one (no
# published sha256 to check them against: the zip's own CRC is the check)
ARC_TRAIN = ("ARC-Challenge/ARC-Challenge-Train.jsonl", "ARC-Easy/ARC-Easy-Train.jsonl")


def mmlu_dir() -> Path:
    """`mmlu/` holding `{dev,val,test}/<subject>_<split>.csv` (the original data.tar CSVs)."""
    root = data_root() / "mmlu"
    missing = [s for s in MMLU_SPLITS if not (root / s).is_dir()]
    if not missing:
        return root
    how = f"extract data/{{dev,val,test}} of {MMLU_URL} into {root}/"
    with _staging(data_root(), "MMLU", root, how) as tmp:
        archive = _download(MMLU_URL, tmp, "MMLU", root, how)
        member = re.compile(r"(?:^|/)data/(dev|val|test)/([^/]+\.csv)$")
        with tarfile.open(archive) as tar:
            for info in tar:
                m = member.search(info.name)
                if m and info.isfile():
                    _write_member(tar.extractfile(info), tmp / "mmlu" / m[1] / m[2])
        for split in missing:
            got = _concat_sha256(tmp / "mmlu" / split)
            if got != MMLU_SPLIT_SHA256[split]:
                raise MissingFileError(f"MMLU {split} CSVs from {MMLU_URL} have sha256 {got}, "
                                       f"expected {MMLU_SPLIT_SHA256[split]}; {how} by hand")
        root.mkdir(parents=True, exist_ok=True)
        for split in missing:  # one rename per split folder: each appears whole or not at all
            (tmp / "mmlu" / split).rename(root / split)
    return root


def mmlu_subjects(split: str = "test") -> list[str]:
    folder = mmlu_dir() / split
    return sorted(p.name[: -len(f"_{split}.csv")] for p in folder.glob(f"*_{split}.csv"))


def wikitext2_raw(split: str = "test") -> Path:
    """`wikitext2/raw/wiki.<split>.raw` from the Salesforce wikitext-2-raw-v1 zip."""
    folder = data_root() / "wikitext2" / "raw"
    path = folder / f"wiki.{split}.raw"
    if path.exists():
        return path
    how = f"unzip wikitext-2-raw/wiki.*.raw of {WIKITEXT2_RAW_URL} into {folder}/"
    # No published sha256 exists for these files, so only the zip's own CRC checks them.
    _fetch_zip_members(WIKITEXT2_RAW_URL, "WikiText-2 raw", folder, how,
                       {f"wikitext-2-raw/{name}": name for name in WIKITEXT2_RAW_FILES}, {})
    return path


def arc_dir(want: Path | None = None) -> Path:
    """`arc/ARC-{Easy,Challenge}/ARC-*-{Test,Dev}.jsonl` from AI2's ARC-V1-Feb2018 zip, and the
    `-Train.jsonl` file `want` names when a task asks for one."""
    root = data_root() / "arc"
    train = [rel for rel in ARC_TRAIN if want == root / rel]
    needed = [*ARC_SHA256, *train]
    if all((root / rel).exists() for rel in needed):
        return root
    what, how = "AI2 ARC", f"unzip ARC-Easy/ and ARC-Challenge/ of {ARC_URL} into {root}/"
    if train:   # the few-shot pool: offline, the Dev rows are the way out (another task version)
        dev = train[0].replace("-Train.", "-Dev.")
        what = f"AI2 ARC's {Path(train[0]).name} (lm-eval's few-shot pool)"
        how += f"; or draw the shots from the Dev rows: task.fewshot_path=arc/{dev} task.fewshot_sampler=first_n"
    _fetch_zip_members(ARC_URL, what, root, how, {rel: rel for rel in needed}, ARC_SHA256)
    return root


def sms_spam_file() -> Path:
    """`sms_spam/SMSSpamCollection` (UCI SMS Spam Collection v.1, `ham|spam<TAB>text` lines)."""
    folder = data_root() / "sms_spam"
    path = folder / "SMSSpamCollection"
    if path.exists():
        return path
    how = f"unzip SMSSpamCollection of {SMS_SPAM_URL} into {folder}/"
    _fetch_zip_members(SMS_SPAM_URL, "SMS Spam Collection", folder, how,
                       {"SMSSpamCollection": "SMSSpamCollection"}, {"SMSSpamCollection": SMS_SPAM_SHA256})
    return path


FETCHERS = {"mmlu": lambda _want: mmlu_dir(), "wikitext2": lambda _want: wikitext2_raw("test").parent,
            "arc": arc_dir, "sms_spam": lambda _want: sms_spam_file().parent}   # each gets the file asked for


def local_path(path: str | Path) -> Path:
    """Resolve a task's data path: absolute, relative to the working directory, or relative to
    data_root() (fetching the dataset its first folder names when that has a fetcher)."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        if not p.exists():
            raise MissingFileError(f"data file {p} not found")
        full = p
    else:
        full = data_root() / p
        if not full.exists() and p.parts and p.parts[0] in FETCHERS:
            FETCHERS[p.parts[0]](full)
        if not full.exists():
            raise MissingFileError(f"data file {full} not found; put it there (or set HARNESS_DATA)")
    if full.is_dir():
        raise MissingFileError(f"{full} is a folder; name a data file in it (task.path=...)")
    return full


# --- helpers -------------------------------------------------------------------------------------

class _staging:
    """A hidden temp folder next to the destination (same filesystem, so renames are atomic),
    removed on exit whatever happens. OS errors inside become MissingFileError with `how`."""

    def __init__(self, parent: Path, what: str, dest: Path, how: str):
        self.parent, self.what, self.dest, self.how = parent, what, dest, how

    def __enter__(self) -> Path:
        try:
            self.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(dir=self.parent, prefix=".staging-"))
        except OSError as e:
            raise MissingFileError(f"{self.what} not found at {self.dest} and {self.parent} is not "
                                   f"writable ({e}); {self.how}, or set HARNESS_DATA") from None
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        shutil.rmtree(self.tmp, ignore_errors=True)
        if exc_type is not None and issubclass(exc_type, (OSError, tarfile.TarError, zipfile.BadZipFile)) \
                and not issubclass(exc_type, MissingFileError):
            raise MissingFileError(f"{self.what}: fetching into {self.dest} failed "
                                   f"({exc_type.__name__}: {exc}); {self.how}") from None
        return False


def _download(url: str, tmp: Path, what: str, dest: Path, how: str) -> Path:
    try:
        return download(url, tmp / url.rsplit("/", 1)[-1])
    except Exception as e:  # network errors come in many types; all mean the same to a user
        raise MissingFileError(f"{what} not found at {dest} and downloading {url} failed "
                               f"({type(e).__name__}: {e}); {how}, or point HARNESS_DATA at a "
                               f"folder that has it") from None


def _write_member(src, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    with src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, length=1 << 20)


def _concat_sha256(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.glob("*.csv"), key=lambda p: p.name.encode()):
        h.update(p.read_bytes())
    return h.hexdigest()


def _fetch_zip_members(url: str, what: str, dest: Path, how: str,
                       wanted: dict[str, str], sha256: dict[str, str]) -> None:
    """Extract zip members whose path ends with a key of `wanted` to dest/<value>, only those
    that are missing, checking sha256 where given; each file is renamed into place whole."""
    todo = {suffix: rel for suffix, rel in wanted.items() if not (dest / rel).exists()}
    with _staging(data_root(), what, dest, how) as tmp:
        archive = _download(url, tmp, what, dest, how)
        with zipfile.ZipFile(archive) as zf:
            for name in zf.namelist():
                for suffix, rel in todo.items():
                    if name == suffix or name.endswith("/" + suffix):
                        _write_member(zf.open(name), tmp / "out" / rel)
        for rel in todo.values():
            staged = tmp / "out" / rel
            if not staged.exists():
                raise MissingFileError(f"{url} has no member ending in {rel}; {how} by hand")
            if rel in sha256 and sha256_file(staged) != sha256[rel]:
                raise MissingFileError(f"{rel} from {url} fails its sha256 check; {how} by hand")
        for rel in todo.values():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / "out" / rel).replace(dest / rel)
