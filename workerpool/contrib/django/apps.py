"""The Django app that provides the `async_command` management command."""

from __future__ import annotations

from django.apps import AppConfig


class WorkerpoolConfig(AppConfig):
    name = "workerpool.contrib.django"
    label = "workerpool"
    verbose_name = "workerpool"
