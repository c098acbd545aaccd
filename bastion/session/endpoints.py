"""The approval HTTP API, as Starlette routes the gateway mounts."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from bastion.errors import AuthError, StoreError
from bastion.events import Identity
from bastion.session.approvals import (
    Approval,
    ApprovalConflict,
    ApprovalNotFound,
    ApprovalService,
    Authorize,
)

__all__ = ["ResolveIdentity", "approval_routes"]

ResolveIdentity = Callable[[Request], Identity | Awaitable[Identity]]


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


def approval_routes(
    service: ApprovalService,
    *,
    resolve_identity: ResolveIdentity,
    authorize: Authorize,
    prefix: str = "/approvals",
) -> list[Route]:
    """Routes for approvers, to mount in a Starlette app or router:

    - ``GET {prefix}``: the pending approvals this approver may decide;
    - ``GET {prefix}/{id}``: one approval (if the approver may decide it);
    - ``POST {prefix}/{id}/approve`` and ``POST {prefix}/{id}/deny``.

    ``resolve_identity(request)`` (sync or async) authenticates the approver
    and raises :class:`AuthError` when it cannot; ``authorize(approver,
    approval)`` is the policy check, applied to every listed, shown or decided
    approval. Answers are JSON; errors are ``{"error": {"code", "message"}}``
    with 401/403 (auth), 404 (unknown or expired), 409 (already decided) or
    503 (store failure: nothing is decided).
    """

    async def approver_of(request: Request) -> Identity:
        who = resolve_identity(request)
        if inspect.isawaitable(who):
            who = await who
        if not isinstance(who, Identity):
            raise AuthError("approver identity could not be established")
        return who

    async def allowed(approver: Identity, approval: Approval) -> bool:
        verdict = authorize(approver, approval)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return verdict is True

    async def guarded(
        request: Request, action: Callable[[Identity], Awaitable[JSONResponse]]
    ) -> JSONResponse:
        try:
            return await action(await approver_of(request))
        except AuthError as exc:
            return _error(exc.status, exc.code, exc.message, exc.headers)
        except ApprovalNotFound as exc:
            return _error(404, "not_found", str(exc))
        except ApprovalConflict as exc:
            return _error(409, "conflict", str(exc))
        except StoreError as exc:
            return _error(503, "store_unavailable", str(exc))

    async def list_pending(request: Request) -> JSONResponse:
        async def action(approver: Identity) -> JSONResponse:
            visible = [a.to_json() for a in await service.pending() if await allowed(approver, a)]
            return JSONResponse({"approvals": visible})

        return await guarded(request, action)

    async def show(request: Request) -> JSONResponse:
        async def action(approver: Identity) -> JSONResponse:
            approval_id = request.path_params["approval_id"]
            approval = await service.get(approval_id)
            if approval is None:
                raise ApprovalNotFound(f"approval {approval_id!r} does not exist or expired")
            if not await allowed(approver, approval):
                raise AuthError(
                    f"{approver.subject} may not see this approval", status=403, code="forbidden"
                )
            return JSONResponse(approval.to_json())

        return await guarded(request, action)

    async def approve(request: Request) -> JSONResponse:
        async def action(approver: Identity) -> JSONResponse:
            decided = await service.approve(request.path_params["approval_id"], approver, authorize)
            return JSONResponse(decided.to_json())

        return await guarded(request, action)

    async def deny(request: Request) -> JSONResponse:
        async def action(approver: Identity) -> JSONResponse:
            decided = await service.deny(request.path_params["approval_id"], approver, authorize)
            return JSONResponse(decided.to_json())

        return await guarded(request, action)

    return [
        Route(prefix, list_pending, methods=["GET"]),
        Route(prefix + "/{approval_id}", show, methods=["GET"]),
        Route(prefix + "/{approval_id}/approve", approve, methods=["POST"]),
        Route(prefix + "/{approval_id}/deny", deny, methods=["POST"]),
    ]
