COMPILE_OPTIONS = ("--std=c++17",)
