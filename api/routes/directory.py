"""Organisations, API keys, groups and topics (writes: admin; reads: any valid key)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request, Response, status

from api.deps import AdminDep, CallerDep, SessionDep
from api.ids import parse_id, parse_ref
from api.pages import page_response
from api.problems import responses
from api.schemas import (
    GroupCreate,
    GroupMembers,
    GroupOut,
    KeyCreate,
    KeyIssued,
    KeyOut,
    ListOf,
    OrganisationCreate,
    OrganisationOut,
    OrganisationPatch,
    TopicCreate,
    TopicOut,
    TopicPatch,
)
from domain import directory, keys
from domain.models import ApiKey, Group, Kind, Level, Organisation, Topic

router = APIRouter(prefix="/v1", responses=responses(404, 409))

Cursor = Annotated[str | None, Query(max_length=500)]
Limit = Annotated[int | None, Query(ge=1, le=200)]


def org_out(org: Organisation) -> OrganisationOut:
    return OrganisationOut.model_validate(
        {**{c: getattr(org, c) for c in OrganisationOut.model_fields if hasattr(org, c)},
         "id": str(org.id), "parent_id": str(org.parent_id) if org.parent_id else None}
    )


def key_out(key: ApiKey) -> dict[str, Any]:
    return {"id": str(key.id), "organisation_id": str(key.organisation_id),
            "prefix": key.prefix, "scopes": key.scopes, "name": key.name,
            "created_at": key.created_at, "last_used_at": key.last_used_at,
            "revoked_at": key.revoked_at}


# --------------------------------------------------------------------------- organisations


@router.post("/organisations", status_code=status.HTTP_201_CREATED, tags=["organisations"],
             response_model=OrganisationOut)
def create_organisation(body: OrganisationCreate, actor: AdminDep, session: SessionDep,
                        response: Response) -> OrganisationOut:
    fields = body.model_dump()
    fields["parent_id"] = parse_ref(body.parent_id, "parent_id") if body.parent_id else None
    org = directory.create_organisation(session, actor, directory.OrganisationFields(**fields))
    response.headers["Location"] = f"/v1/organisations/{org.id}"
    return org_out(org)


@router.get("/organisations", tags=["organisations"], response_model=ListOf[OrganisationOut])
def list_organisations(request: Request, response: Response, _actor: CallerDep,
                       session: SessionDep, kind: Kind | None = None, level: Level | None = None,
                       province_nis: Annotated[str | None, Query(pattern=r"^\d{5}$")] = None,
                       nis_code: Annotated[str | None, Query(pattern=r"^\d{5}$")] = None,
                       cursor: Cursor = None, limit: Limit = None) -> dict[str, Any]:
    page = directory.list_organisations(session, kind=kind, level=level,
                                        province_nis=province_nis, nis_code=nis_code,
                                        cursor=cursor, limit=limit)
    return page_response(request, response, page, org_out)


@router.get("/organisations/{organisation_id}", tags=["organisations"],
            response_model=OrganisationOut)
def get_organisation(organisation_id: str, _actor: CallerDep,
                     session: SessionDep) -> OrganisationOut:
    return org_out(directory.get_organisation(session, parse_id(organisation_id, "organisation")))


@router.patch("/organisations/{organisation_id}", tags=["organisations"],
              response_model=OrganisationOut)
def patch_organisation(organisation_id: str, body: OrganisationPatch, actor: AdminDep,
                       session: SessionDep) -> OrganisationOut:
    changes = body.model_dump(exclude_unset=True)
    if changes.get("parent_id") is not None:
        changes["parent_id"] = parse_ref(changes["parent_id"], "parent_id")
    for required in ("name", "level", "kind"):
        if required in changes and changes[required] is None:
            changes.pop(required)
    org = directory.update_organisation(session, actor, parse_id(organisation_id,
                                                                 "organisation"), changes)
    return org_out(org)


# ------------------------------------------------------------------------------------ keys


@router.post("/organisations/{organisation_id}/keys", status_code=status.HTTP_201_CREATED,
             tags=["keys"], response_model=KeyIssued)
def issue_key(organisation_id: str, body: KeyCreate, actor: AdminDep,
              session: SessionDep) -> dict[str, Any]:
    issued = keys.issue_key(session, actor, parse_id(organisation_id, "organisation"),
                            [s.value for s in body.scopes], body.name)
    return {**key_out(issued.key), "key": issued.plaintext}


@router.get("/organisations/{organisation_id}/keys", tags=["keys"], response_model=ListOf[KeyOut])
def list_keys(organisation_id: str, _actor: AdminDep, session: SessionDep) -> dict[str, Any]:
    found = keys.list_keys(session, parse_id(organisation_id, "organisation"))
    return {"items": [key_out(k) for k in found], "next_cursor": None}


@router.delete("/keys/{key_id}", tags=["keys"], response_model=KeyOut)
def revoke_key(key_id: str, actor: AdminDep, session: SessionDep) -> dict[str, Any]:
    return key_out(keys.revoke_key(session, actor, parse_id(key_id, "key")))


# ---------------------------------------------------------------------------------- groups


def group_out(session: SessionDep, group: Group) -> GroupOut:
    members = directory.group_member_ids(session, group.id)
    return GroupOut(id=str(group.id), name=group.name, description=group.description,
                    members=[str(m) for m in members], created_at=group.created_at)


@router.post("/groups", status_code=status.HTTP_201_CREATED, tags=["groups"],
             response_model=GroupOut)
def create_group(body: GroupCreate, actor: AdminDep, session: SessionDep,
                 response: Response) -> GroupOut:
    members = [parse_ref(m, "members") for m in body.members]
    group = directory.create_group(session, actor, body.name, body.description, members)
    response.headers["Location"] = f"/v1/groups/{group.id}"
    return group_out(session, group)


@router.get("/groups", tags=["groups"], response_model=ListOf[GroupOut])
def list_groups(request: Request, response: Response, _actor: CallerDep, session: SessionDep,
                cursor: Cursor = None, limit: Limit = None) -> dict[str, Any]:
    page = directory.list_groups(session, cursor, limit)
    return page_response(request, response, page, lambda g: group_out(session, g))


@router.get("/groups/{group_id}", tags=["groups"], response_model=GroupOut)
def get_group(group_id: str, _actor: CallerDep, session: SessionDep) -> GroupOut:
    return group_out(session, directory.get_group(session, parse_id(group_id, "group")))


@router.put("/groups/{group_id}/members", tags=["groups"], response_model=GroupOut)
def set_members(group_id: str, body: GroupMembers, actor: AdminDep,
                session: SessionDep) -> GroupOut:
    members = [parse_ref(m, "members") for m in body.members]
    group = directory.set_group_members(session, actor, parse_id(group_id, "group"), members)
    return group_out(session, group)


# ---------------------------------------------------------------------------------- topics


def topic_out(session: SessionDep, topic: Topic, parents: dict[Any, str] | None = None) -> TopicOut:
    if parents is None:
        parents = directory.topic_slugs_by_id(session, {topic.parent_id} if topic.parent_id
                                              else set())
    return TopicOut(slug=topic.slug, parent=parents.get(topic.parent_id) if topic.parent_id
                    else None, name_nl=topic.name_nl, name_en=topic.name_en,
                    definition_nl=topic.definition_nl, definition_en=topic.definition_en,
                    deprecated=topic.deprecated)


@router.post("/topics", status_code=status.HTTP_201_CREATED, tags=["topics"],
             response_model=TopicOut)
def create_topic(body: TopicCreate, actor: AdminDep, session: SessionDep,
                 response: Response) -> TopicOut:
    topic = directory.create_topic(session, actor, **body.model_dump())
    response.headers["Location"] = f"/v1/topics/{topic.slug}"
    return topic_out(session, topic)


@router.get("/topics", tags=["topics"], response_model=ListOf[TopicOut])
def list_topics(request: Request, response: Response, _actor: CallerDep, session: SessionDep,
                include_deprecated: bool = False,
                parent: Annotated[str | None, Query(max_length=100)] = None,
                cursor: Cursor = None, limit: Limit = None) -> dict[str, Any]:
    # Deprecated topics keep matching old subscriptions but are no longer offered.
    page = directory.list_topics(session, include_deprecated=include_deprecated,
                                 parent=parent, cursor=cursor, limit=limit)
    parents = directory.topic_slugs_by_id(session, {t.parent_id for t in page.items
                                                    if t.parent_id})
    return page_response(request, response, page, lambda t: topic_out(session, t, parents))


@router.get("/topics/{slug}", tags=["topics"], response_model=TopicOut)
def get_topic(slug: str, _actor: CallerDep, session: SessionDep) -> TopicOut:
    return topic_out(session, directory.get_topic(session, slug))


@router.patch("/topics/{slug}", tags=["topics"], response_model=TopicOut)
def patch_topic(slug: str, body: TopicPatch, actor: AdminDep, session: SessionDep) -> TopicOut:
    changes = {k: v for k, v in body.model_dump(exclude_unset=True).items()
               if v is not None or k == "parent"}
    return topic_out(session, directory.update_topic(session, actor, slug, changes))
