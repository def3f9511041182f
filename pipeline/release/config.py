"""Config section `release`: how the release bundle is named and stamped."""

from __future__ import annotations

from typing import Optional

from pydantic import Field

from ..schema import OmitNoneOptions, Section


class SignConfig(Section):
    """OpenSSF model signing of the bundle (the `sign` extra), with a local elliptic-curve key: offline."""

    private_key: str = Field(description="PEM elliptic-curve private key (P-256/384/521) that signs bundle.sig")
    password_env: Optional[str] = Field(None, description="environment variable holding the key's passphrase, "
                                                          "if it is encrypted")


class ReleaseConfig(OmitNoneOptions):
    omit_when_none = ("sign",)

    version: str = Field(
        "0.1.0", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$",
        description="release version; the tarball is <build>-<version>.tar.gz",
    )
    source_date_epoch: Optional[int] = Field(
        None, ge=0,
        description="mtime stamped on every tar entry; unset: $SOURCE_DATE_EPOCH, else 0 (1970-01-01)",
    )
    include_eval_set: bool = Field(True, description="ship eval.npz so the device tests can measure accuracy")
    intended_use: Optional[str] = Field(
        None, description="one paragraph for the model card; unset: generated from the subtask classes",
    )
    allow_failed_validation: bool = Field(
        False, description="cut the release even though validation missed a check; the model card's first line "
                           "then says so (default: a failed validation fails the build and no release is cut)",
    )
    sign: Optional[SignConfig] = Field(
        None, description="sign the bundle (bundle.sig, OpenSSF model signing); check it with `edgesmith verify "
                          "BUNDLE --public-key K`",
    )
