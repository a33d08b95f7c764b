from django.db import migrations, models


class Migration(migrations.Migration):
    initial = True

    dependencies: list[tuple[str, str]] = []

    operations = [
        migrations.CreateModel(
            name="TaskRecord",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False,
                                           verbose_name="ID")),
                ("task_id", models.CharField(max_length=64, unique=True)),
                ("kind", models.CharField(max_length=64)),
                ("queue", models.CharField(default="", max_length=200)),
                ("worker_pid", models.IntegerField(default=0)),
            ],
        ),
    ]
