//! vCPU configuration: CPUID templates and boot registers.
