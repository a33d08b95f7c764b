from django.db import models


class TaskRecord(models.Model):
    """One row per task the handler ran (keyed on the task id: redelivery adds nothing)."""

    task_id = models.CharField(max_length=64, unique=True)
    kind = models.CharField(max_length=64)
    queue = models.CharField(max_length=200, default="")
    worker_pid = models.IntegerField(default=0)
