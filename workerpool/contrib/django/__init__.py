"""Django integration: add "workerpool.contrib.django" to INSTALLED_APPS, then run
`python manage.py async_command [--redis-key K] [--interval S] [--max-tasks N] [--workers N]`.

The command reads settings.WORKERPOOL (a dict of config keys) and/or an INI file
(settings.WORKERPOOL_CONFIG or --config) and runs the pool's supervisor in the foreground.
"""
