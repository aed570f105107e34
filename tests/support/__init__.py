"""What the tests share: frame and record builders, fake NVML answers, a sysfs tree, local
HTTP receivers, the scenario loader, the polling helper and the running servers' helpers.
Test modules import from here, never from each other."""
