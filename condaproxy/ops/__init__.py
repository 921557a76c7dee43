"""Running condaproxy as a service and operating it from a shell: systemd notification, logging,
reloads, and the commands that talk to a running proxy (stats, gc, invalidate, prefetch)."""
