"""``/v1/ekms/review``: the access report and review campaigns (docs/access-control.md).

Thin on purpose: each route parses, calls ``kms.review_service.ReviewService`` and renders. A
state conflict (a closed campaign, an item already decided, a period over, a close that would
lock every security officer out, a race lost twice) answers 409, as on every ``/v1/ekms/`` path
(``api.errors.status_for``).
"""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import APIRouter
from pydantic import StringConstraints
from starlette.requests import Request
from starlette.responses import Response

from api.http import Body, Call, Handler, Work, envelope, parse_model
from kms.errors import InvalidRequestError
from kms.review import SECTIONS, report_to_csv, report_to_json
from kms.review_service import ReportQuery

if TYPE_CHECKING:
    from collections.abc import Mapping

    from kms.identity import Principal
    from kms.review import AccessReport, Campaign
    from kms.review_service import CampaignView, ClosePlan, ReviewService

CSV = "text/csv; charset=utf-8"
_REPORT_PARAMS = frozenset(
    {"format", "section", "since", "until", "principal", "dataset", "site", "dormant_days"}
)
_LIST_PARAMS = frozenset({"list", "state", "limit"})
_FORMATS = ("json", "csv")
PrincipalId = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class OpenRequest(Body):
    duration: Any  # seconds, or a duration string ("72h"): kms.review_service.parse_duration
    scope: list[PrincipalId] | None = None


class CertifyRequest(Body):
    principal: PrincipalId
    note: str = ""


class RevokeRequest(Body):
    principal: PrincipalId
    note: str


def _check_params(query: Mapping[str, str], allowed: frozenset[str]) -> None:
    unknown = sorted(set(query) - allowed)
    if unknown:
        raise InvalidRequestError(f"unknown query parameter {unknown[0]!r}")


def parse_report_params(
    params: Mapping[str, str], now: float
) -> tuple[str, str | None, ReportQuery]:
    """The report's format, section (required for CSV) and filters, from the query string."""
    _check_params(params, _REPORT_PARAMS)
    form = params.get("format", "json")
    if form not in _FORMATS:
        raise InvalidRequestError("format must be json or csv")
    section = params.get("section")
    if section is not None and section not in SECTIONS:
        raise InvalidRequestError(
            f"unknown report section {section[:40]!r}; sections are: {', '.join(SECTIONS)}"
        )
    if form == "csv" and section is None:
        raise InvalidRequestError(
            f"section is required with format=csv; sections are: {', '.join(SECTIONS)}"
        )
    return form, section, ReportQuery.from_params(params, now)


def report_data(report: AccessReport, section: str | None) -> dict[str, Any]:
    """The report as JSON; with ``section``, only that section besides what says what it is."""
    data = report_to_json(report)
    if section is None:
        return data
    key = section.replace("-", "_")
    return {
        "generated_at": data["generated_at"],
        "filters": data["filters"],
        "skipped_records": data["skipped_records"],
        key: data[key],
    }


def principal_json(principal: Principal | None) -> dict[str, Any]:
    if principal is None:  # principals are never deleted; shown rather than failing the view
        return {"roles": [], "display_name": "", "active": False}
    return {
        "roles": sorted(r.value for r in principal.roles),
        "display_name": principal.display_name,
        "active": principal.active,
    }


def view_json(view: CampaignView) -> dict[str, Any]:
    return {
        "campaign": view.campaign.to_json(),
        "principals": {p: principal_json(found) for p, found in view.principals.items()},
    }


def summary_json(campaign: Campaign) -> dict[str, Any]:
    counts = Counter(item.state.value for item in campaign.items.values())
    return {
        "id": campaign.id,
        "state": campaign.state.value,
        "opened_by": campaign.opened_by,
        "opened_at": campaign.opened_at,
        "closes_at": campaign.closes_at,
        "pending": counts["pending"],
        "certified": counts["certified"],
        "revoked": counts["revoked"],
    }


def closed_json(plan: ClosePlan) -> dict[str, Any]:
    return {
        "campaign": plan.campaign.to_json(),
        "suspended": list(plan.suspended),
        "revoked": list(plan.revoked),
        "left_to_quorum": list(plan.left_to_quorum),
    }


def build_router(handler: Handler) -> APIRouter:  # noqa: C901 - one closure per path
    router = APIRouter(prefix="/v1/ekms/review", tags=["review"])
    runtime = handler.runtime

    def review() -> ReviewService:
        return runtime.review

    async def run(request: Request, operation: str, work: Work, **options: Any) -> Response:
        return await handler.run(request, operation, work, root_only=False, **options)

    @router.get("/report")
    async def report(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            form, section, query = parse_report_params(request.query_params, runtime.clock.now())
            call.details.update({"format": form, **query.details()})
            if section is not None:
                call.details["section"] = section
            built = review().report(call.caller, query)
            if form == "json":
                return 200, envelope(call, report_data(built, section))
            assert section is not None
            return 200, Response(
                report_to_csv(built, section).encode(),
                media_type=CSV,
                headers={
                    "Content-Disposition": f'attachment; filename="ekms-review-{section}.csv"'
                },
            )

        return await run(request, "review.report", work, body=False)

    @router.api_route("/campaigns", methods=["GET", "LIST"])
    async def list_campaigns(request: Request) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            params = request.query_params
            _check_params(params, _LIST_PARAMS)
            listed = review().campaigns(
                call.caller, state=params.get("state"), limit=params.get("limit", "100")
            )
            return 200, envelope(
                call,
                {
                    "keys": [campaign.id for campaign, _ in listed],
                    "campaigns": [summary_json(campaign) for campaign, _ in listed],
                },
            )

        return await run(request, "review.campaign.list", work, body=False)

    @router.api_route("/campaigns", methods=["POST", "PUT"])
    async def open_campaign(request: Request) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            body = parse_model(OpenRequest, data)
            view = review().open(call.caller, duration=body.duration, scope=body.scope)
            campaign = view.campaign
            call.details.update(
                campaign=campaign.id,
                closes_at=int(campaign.closes_at),
                principals=len(campaign.items),
                scoped=campaign.scope is not None,
            )
            return 200, envelope(call, view_json(view))

        return await run(request, "review.campaign.open", work)

    @router.get("/campaigns/{campaign_id}")
    async def read_campaign(request: Request, campaign_id: str) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            call.details["campaign"] = campaign_id[:64]
            return 200, envelope(call, view_json(review().campaign(call.caller, campaign_id)))

        return await run(request, "review.campaign.read", work, body=False)

    @router.api_route("/campaigns/{campaign_id}/certify", methods=["POST", "PUT"])
    async def certify(request: Request, campaign_id: str) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            call.details.update(campaign=campaign_id[:64], decision="certified")
            body = parse_model(CertifyRequest, data)
            call.details["target"] = body.principal[:64]
            view = review().certify(call.caller, campaign_id, body.principal, body.note)
            return 200, envelope(call, view_json(view))

        return await run(request, "review.campaign.certify", work)

    @router.api_route("/campaigns/{campaign_id}/revoke", methods=["POST", "PUT"])
    async def revoke(request: Request, campaign_id: str) -> Response:
        def work(call: Call, data: dict[str, Any]) -> tuple[int, Any]:
            call.details.update(campaign=campaign_id[:64], decision="revoked")
            body = parse_model(RevokeRequest, data)
            call.details["target"] = body.principal[:64]
            view = review().revoke(call.caller, campaign_id, body.principal, body.note)
            return 200, envelope(call, view_json(view))

        return await run(request, "review.campaign.revoke", work)

    @router.api_route("/campaigns/{campaign_id}/close", methods=["POST", "PUT"])
    async def close(request: Request, campaign_id: str) -> Response:
        def work(call: Call, _data: dict[str, Any]) -> tuple[int, Any]:
            call.details["campaign"] = campaign_id[:64]
            plan = review().close(call.caller, campaign_id)
            call.details.update(
                suspended=list(plan.suspended),
                revoked=list(plan.revoked),
                left_to_quorum=list(plan.left_to_quorum),
            )
            return 200, envelope(call, closed_json(plan))

        return await run(request, "review.campaign.close", work, body=False)

    return router
