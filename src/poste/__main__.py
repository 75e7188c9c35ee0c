from poste.launch_cli import main

main()
