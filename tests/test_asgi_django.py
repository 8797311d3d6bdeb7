"""Django's own ASGI handler on rtserve: sync and async views, a JSON POST, 404, streaming."""

from __future__ import annotations

import asyncio
import json
import sys
import types

import pytest
import requests

django = pytest.importorskip("django")

from django.conf import settings  # noqa: E402

from tests.helpers import server_thread  # noqa: E402


def _urls() -> types.ModuleType:
    from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
    from django.urls import path

    def hello(request):  # a sync view: Django runs it in a thread (sync_to_async)
        return HttpResponse(f"Hello, {request.GET.get('name', 'world')}!\n",
                            content_type="text/plain")

    async def score(request):
        tx = json.loads(request.body)
        await asyncio.sleep(0)
        return JsonResponse({"id": tx["id"], "decision": "approve"})

    async def stream(request):
        async def rows():
            for i in range(3):
                await asyncio.sleep(0)
                yield f"row {i}\n"
        return StreamingHttpResponse(rows(), content_type="text/plain")

    module = types.ModuleType("rtserve_test_django_urls")
    module.urlpatterns = [  # type: ignore[attr-defined]
        path("hello", hello), path("score", score), path("stream", stream),
    ]
    return module


@pytest.fixture(scope="module")
def django_app():
    if not settings.configured:
        sys.modules["rtserve_test_django_urls"] = _urls()
        settings.configure(
            DEBUG=False, SECRET_KEY="test", ROOT_URLCONF="rtserve_test_django_urls",
            ALLOWED_HOSTS=["*"], MIDDLEWARE=[], INSTALLED_APPS=[], USE_TZ=True,
        )
    from django.core.asgi import get_asgi_application

    return get_asgi_application()


def test_django_asgi_handler(django_app):
    with server_thread(django_app) as srv:
        base = f"http://{srv.address[0]}:{srv.address[1]}"
        r = requests.get(base + "/hello?name=Zo%C3%AB")
        assert r.status_code == 200 and r.content.decode() == "Hello, Zoë!\n"
        r = requests.post(base + "/score", json={"id": 3})
        assert r.json() == {"id": 3, "decision": "approve"}
        assert requests.get(base + "/nope").status_code == 404
        r = requests.get(base + "/stream")
        assert r.text == "row 0\nrow 1\nrow 2\n"
