"""The chain: every stage is one recipe file here, and CHAIN lists them in the order they run. A stage reads the
config and its inputs' folders, calls the feature packages (data, models, distill, quantize, exporters,
validation, release, ...) and writes its folder; it never holds an algorithm itself."""

from .adapt import AdaptStage
from .distill import DistillStage
from .export import ExportStage
from .qat import QATStage
from .release import ReleaseStage
from .search import SearchStage
from .subspaces import SubspacesStage
from .teacher import TeacherStage
from .validate import ValidateStage

CHAIN = (TeacherStage, AdaptStage, SubspacesStage, SearchStage, DistillStage, QATStage, ExportStage, ValidateStage, ReleaseStage)

__all__ = ["CHAIN", "TeacherStage", "AdaptStage", "SubspacesStage", "SearchStage", "DistillStage", "QATStage", "ExportStage",
           "ValidateStage", "ReleaseStage"]
