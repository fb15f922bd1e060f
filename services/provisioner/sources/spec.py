"""The source grammar, parsed in one place.

    hf:ORG/REPO[:FILE][@REVISION]     a HuggingFace Hub repo (optionally one file, one revision)
    ORG/REPO[:FILE][@REVISION]        the same, without the prefix (the seeds' form)
    civitai:VERSION_ID[:FILENAME]     a CivitAI model version (optionally one of its files)
    https://HOST/PATH  http://...     a plain file (credentials in the URL are refused)
    file:PATH  /ABSOLUTE/PATH         a file or folder on this machine

Everything else is `InvalidArgument` (reason INVALID_SOURCE, field "source") with a hint that
lists these forms. Repo ids follow the Hub's own rules (huggingface_hub `validate_repo_id`);
FILE is a relative path that can never leave the repo (no `..`, no leading `/`, no
backslashes, no NUL). Messages never repeat a URL's query or userinfo (they may hold secrets).
"""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from services.common.errors import InvalidArgument
from services.provisioner.domain import CivitaiSpec, HfSpec, LocalSpec, SourceSpec, UrlSpec
from services.provisioner.http import redact_url

SOURCE_FORMS_HINT = (
    "expected one of: hf:ORG/REPO[:FILE][@REVISION], ORG/REPO[:FILE], "
    "civitai:VERSION_ID[:FILENAME], https://HOST/PATH, file:/ABSOLUTE/PATH or /ABSOLUTE/PATH"
)

MAX_SOURCE_LENGTH = 4096
MAX_REPO_PART_LENGTH = 96  # the Hub's limit for the name (and, in practice, the namespace)
MAX_FILE_LENGTH = 1024
MAX_REVISION_LENGTH = 255
MAX_FILENAME_LENGTH = 255
MAX_VERSION_ID = 2**53  # JSON-safe; real ids are 7 digits

_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?")
_REVISION = re.compile(r"[A-Za-z0-9._][A-Za-z0-9._/+-]*")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _invalid(description: str) -> InvalidArgument:
    return InvalidArgument.for_field(
        "source", f"{description}; {SOURCE_FORMS_HINT}", reason="INVALID_SOURCE"
    )


def parse_source(text: str) -> SourceSpec:
    """Parse a source string into its spec; raise InvalidArgument (INVALID_SOURCE) otherwise."""
    if not isinstance(text, str):
        raise _invalid("the source must be a string")
    text = text.strip()
    if not text:
        raise _invalid("the source is empty")
    if len(text) > MAX_SOURCE_LENGTH:
        raise _invalid(f"the source is longer than {MAX_SOURCE_LENGTH} characters")
    if _CONTROL.search(text):
        raise _invalid("the source contains control characters")
    lowered = text.lower()
    if lowered.startswith(("http://", "https://")):
        return _parse_url(text)
    if lowered.startswith("hf:"):
        return _parse_hf(text[3:])
    if lowered.startswith("civitai:"):
        return _parse_civitai(text[len("civitai:") :])
    if lowered.startswith("file:"):
        return _parse_file(text[len("file:") :])
    if text.startswith("/"):
        return LocalSpec(_absolute_path(text))
    if "://" in text:
        raise _invalid("only http and https URLs are supported")
    if "/" in text.split(":", 1)[0]:
        return _parse_hf(text)
    raise _invalid("not a recognised source")


def validate_repo_id(repo: str) -> str:
    """Check ORG/NAME as the Hub does; return it unchanged or raise INVALID_SOURCE."""
    parts = repo.split("/")
    if len(parts) != 2:
        raise _invalid("a HuggingFace repo id is ORG/NAME (exactly one '/')")
    for part in parts:
        if not 1 <= len(part) <= MAX_REPO_PART_LENGTH or not _REPO_PART.fullmatch(part):
            raise _invalid(
                "a repo id's ORG and NAME are 1-96 characters of letters, digits, '.', '_' "
                "and '-', starting and ending with a letter or digit"
            )
        if "--" in part or ".." in part:
            raise _invalid("a repo id may not contain '--' or '..'")
    if repo.endswith(".git"):
        raise _invalid("a repo id may not end with '.git'")
    return repo


def validate_repo_file(path: str) -> str:
    """A relative path inside a repo that cannot escape it; return it or raise INVALID_SOURCE."""
    if not path:
        raise _invalid("the FILE after ':' is empty")
    if len(path) > MAX_FILE_LENGTH:
        raise _invalid(f"the FILE is longer than {MAX_FILE_LENGTH} characters")
    if "\\" in path or "\x00" in path or _CONTROL.search(path):
        raise _invalid("the FILE may not contain backslashes or control characters")
    if path.startswith("/"):
        raise _invalid("the FILE is a path relative to the repo (no leading '/')")
    for component in path.split("/"):
        if component in ("", ".", ".."):
            raise _invalid("the FILE may not contain empty, '.' or '..' path components")
    return path


def validate_revision(revision: str) -> str:
    """A branch, tag or commit name; return it or raise INVALID_SOURCE."""
    if (
        not 1 <= len(revision) <= MAX_REVISION_LENGTH
        or not _REVISION.fullmatch(revision)
        or ".." in revision
        or "//" in revision
        or revision.endswith(("/", ".lock"))
    ):
        raise _invalid(
            "the REVISION after '@' is a branch, tag or commit (letters, digits, '.', '_', "
            "'-', '+', '/'; no '..')"
        )
    return revision


def _parse_hf(rest: str) -> HfSpec:
    revision: str | None = None
    # The revision follows the LAST '@' (file names with '@' are rare; revisions never hold one).
    if "@" in rest:
        rest, revision = rest.rsplit("@", 1)
        validate_revision(revision)
    repo, sep, file = rest.partition(":")
    validate_repo_id(repo)
    if sep:
        validate_repo_file(file)
    return HfSpec(repo=repo, file=file if sep else None, revision=revision)


def _parse_civitai(rest: str) -> CivitaiSpec:
    version_text, sep, filename = rest.partition(":")
    if not version_text.isascii() or not version_text.isdigit() or len(version_text) > 16:
        raise _invalid("civitai: is followed by a numeric model VERSION id (civitai:12345)")
    version_id = int(version_text)
    if not 0 < version_id < MAX_VERSION_ID:
        raise _invalid("the CivitAI version id must be a positive number")
    if sep and (
        not filename
        or len(filename) > MAX_FILENAME_LENGTH
        or filename in (".", "..")
        or any(c in filename for c in "/\\\x00")
    ):
        raise _invalid("the FILENAME after the version id is a plain file name (no '/')")
    return CivitaiSpec(version_id=version_id, filename=filename if sep else None)


def _parse_url(text: str) -> UrlSpec:
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise _invalid("the URL is malformed (bad host or port)") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise _invalid("only http and https URLs are supported")
    if "@" in parts.netloc:
        raise _invalid(
            "credentials in URLs are not accepted (they would end up in logs and records); "
            "configure a token instead (HF_TOKEN / CIVITAI_API_TOKEN in the provisioner settings)"
        )
    if not parts.hostname:
        raise _invalid(f"the URL {redact_url(text)} has no host")
    if " " in text:
        raise _invalid("the URL contains spaces (percent-encode them)")
    return UrlSpec(url=text)


def _parse_file(rest: str) -> LocalSpec:
    if rest.startswith("//"):
        # file://HOST/PATH: only the local host.
        parts = urlsplit("file:" + rest)
        if parts.netloc not in ("", "localhost"):
            raise _invalid("file:// URLs must name a local path (file:///ABSOLUTE/PATH)")
        rest = unquote(parts.path)
    if not rest.startswith("/"):
        raise _invalid(
            "file: takes an absolute path (the provisioner does not share your working directory)"
        )
    return LocalSpec(_absolute_path(rest))


def _absolute_path(text: str) -> Path:
    if "\x00" in text:
        raise _invalid("the path contains a NUL byte")
    if any(component == ".." for component in text.split("/")):
        raise _invalid("the path may not contain '..' components; give the resolved path")
    # POSIX keeps a leading '//' as implementation-defined: one '/' means the same here.
    return Path("/" + text.lstrip("/"))


def format_source(spec: SourceSpec) -> str:
    """The canonical source string of a spec (what `parse_source` reads back to the same spec)."""
    if isinstance(spec, HfSpec):
        text = f"hf:{spec.repo}"
        if spec.file is not None:
            text += f":{spec.file}"
        if spec.revision is not None:
            text += f"@{spec.revision}"
        return text
    if isinstance(spec, CivitaiSpec):
        return f"civitai:{spec.version_id}" + (f":{spec.filename}" if spec.filename else "")
    if isinstance(spec, UrlSpec):
        return spec.url
    # A file URL, percent-encoded: a path with leading or trailing spaces (which the parser
    # strips from the whole string) or a '%' reads back exactly.
    return "file://" + quote(str(spec.path))
