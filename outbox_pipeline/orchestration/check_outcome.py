"""One evaluation of an asset check, as a check job reports it and as a relay run logs it."""

import dataclasses

import dagster as dg


@dataclasses.dataclass(frozen=True)
class CheckOutcome:
    """One evaluation of a check, as the check job reports it and as a relay run logs it."""

    passed: bool
    severity: dg.AssetCheckSeverity
    description: str
    metadata: dict

    def result(self) -> dg.AssetCheckResult:
        return dg.AssetCheckResult(passed=self.passed, severity=self.severity, description=self.description, metadata=self.metadata)

    def evaluation(self, asset_key: dg.AssetKey, check_name: str) -> dg.AssetCheckEvaluation:
        return dg.AssetCheckEvaluation(
            asset_key=asset_key, check_name=check_name, passed=self.passed, severity=self.severity,
            description=self.description, metadata=self.metadata,
        )
