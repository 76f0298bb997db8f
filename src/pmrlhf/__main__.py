from pmrlhf.cli import main

main()
